"""PerformerAttention: the peers' defects each get a test that would catch them."""

import functools
import math

import pytest
import torch

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    GeneralizedFeatures,
    HyperbolicFeatures,
    PerformerAttention,
    Place,
    PositiveFeatures,
    QKTransform,
    RotaryMode,
)
from transformer_zoo.functional import draw_projection, favor_attention
from transformer_zoo.positional.base import LogitBias

performer_pytorch = pytest.importorskip("performer_pytorch.performer_pytorch")
F64 = torch.float64


class StubRotary(QKTransform):
    """Test-local RoPE: interleaved pairs, θ_i = base^(-2i/dim), angles in fp64."""

    def __init__(self, base: float = 10000.0) -> None:
        super().__init__()
        self.base = base

    def rotate(self, x, positions, *, dim=None):
        dim = x.shape[-1] if dim is None else dim
        theta = self.base ** (-torch.arange(0, dim, 2, dtype=F64) / dim)
        ang = positions.to(F64)[..., None] * theta  # (n, dim/2) or (b, n, dim/2)
        ang = ang[:, None] if ang.ndim == 3 else ang
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., 0:dim:2], x[..., 1:dim:2]
        rot = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
        return torch.cat([rot, x[..., dim:]], -1)

    def forward(self, q, k, q_positions, k_positions):
        return self.rotate(q, q_positions), self.rotate(k, k_positions)


class NoRotate(QKTransform):
    def forward(self, q, k, q_positions, k_positions):
        return q, k


class Bias(LogitBias):
    def forward(self, q, q_positions, k_positions):
        return torch.zeros(())


def features(x, w):
    """Textbook positive features φ(x̂) = r^(-1/2) exp(W x̂ - |x̂|²/2), fp64."""
    xh = x.to(F64) * x.shape[-1] ** -0.25
    return ((xh @ w.to(F64).T) - (xh * xh).sum(-1, keepdim=True) / 2).exp() / math.sqrt(len(w))


def reference(q, k, v, w, causal=False, valid=None, rotate=None):
    """fp64 quadratic form, no stabilizer; ``rotate(fq, fk)`` rotates the numerator only."""
    fq, fk = features(q, w), features(k, w)
    a = fq @ fk.transpose(-2, -1)
    num = a if rotate is None else torch.matmul(*rotate(fq, fk)[:1], rotate(fq, fk)[1].mT)
    n, m = a.shape[-2:]
    keep = torch.ones(n, m, dtype=torch.bool)
    keep = keep.tril() if causal else keep
    keep = keep if valid is None else keep & valid[:, None, None, :]
    return ((num * keep) @ v.to(F64)) / (a * keep).sum(-1, keepdim=True)


def peer_fast_attention(w, causal=False):
    fa = performer_pytorch.FastAttention(w.shape[1], w.shape[0], causal=causal)
    fa.projection_matrix.copy_(w)
    return fa


def qkv(b=2, h=2, n=16, d=16, scale=1.0, dtype=torch.float32):
    return [torch.randn(b, h, n, d, dtype=dtype) * s for s in (scale, scale, 1.0)]


# -- construction ---------------------------------------------------------------------------------
def test_contract_and_validation():
    assert PerformerAttention.accepts == {Place.INPUT, Place.QK}
    assert PerformerAttention.supports_causal
    with pytest.raises(ValueError, match="PerformerAttention cannot use Bias"):
        PerformerAttention(32, 2, positional=Bias())
    with pytest.raises(TypeError, match="FeatureMap"):
        PerformerAttention(32, 2, feature_map="relu")
    with pytest.raises(ValueError, match="rotate"):
        PerformerAttention(32, 2, positional=NoRotate(), rotary=RotaryMode.NUMERATOR)
    with pytest.raises(ValueError, match="nb_features"):
        PerformerAttention(32, 2, nb_features=0)
    attn = PerformerAttention(32, 2, nb_features=8)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.randn(1, 4, 32), attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal=True"):
        attn.step(torch.randn(1, 1, 32))


def test_state_dict_round_trip_reproduces_outputs_exactly():
    a = PerformerAttention(32, 2, nb_features=16, seed=1, redraw_interval=1)
    x = torch.randn(2, 7, 32)
    a(x), a(x)  # two training calls: W redrawn once
    b = PerformerAttention(32, 2, nb_features=16, seed=99, redraw_interval=1)
    b.load_state_dict(a.state_dict())
    assert {"projection", "seed", "calls"} <= set(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    b.train()
    a.train()
    assert torch.equal(a(x), b(x))  # the next redraw agrees too (seed, counter restored)


def test_redraw_is_deterministic_training_only_and_per_layer():
    kw = dict(nb_features=16, seed=5, redraw_interval=2)
    a, b = PerformerAttention(32, 2, layer=3, **kw), PerformerAttention(32, 2, layer=3, **kw)
    c = PerformerAttention(32, 2, layer=4, **kw)
    x = torch.randn(1, 5, 32)
    w0 = a.projection.clone()
    assert torch.equal(w0, draw_projection(16, 16, seed=5, step=0, layer=3))
    a(x), a(x)
    assert torch.equal(a.projection, w0)  # calls 0, 1 use step 0
    a(x)
    assert torch.equal(a.projection, draw_projection(16, 16, seed=5, step=1, layer=3))
    for _ in range(3):
        b(x), c(x)
    assert torch.equal(a.projection, b.projection)  # "another rank": same W, no communication
    assert not torch.equal(a.projection, c.projection)
    a.eval()
    for _ in range(4):
        a(x)
    assert int(a.calls) == 3 and torch.equal(a.projection, b.projection)  # never in eval


# -- stabilizers and masking: ours vs the peer ---------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_values_of_one_give_rows_of_one_with_padding(causal):
    q, k, _ = qkv()
    valid = torch.rand(2, 16) > 0.4
    valid[:, 0] = True
    w = draw_projection(32, 16, seed=0)
    ones = torch.ones(2, 2, 16, 16)
    out = favor_attention(q, k, ones, w, causal=causal, key_padding_mask=valid)
    torch.testing.assert_close(out, torch.ones_like(out))
    # performer-pytorch masks values only: padded keys stay in the denominator
    peer = peer_fast_attention(w)(q, k, ones * valid[:, None, :, None])
    assert (peer < 0.95).any()


@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(causal):
    attn = PerformerAttention(32, 4, nb_features=32, causal=causal, seed=0)
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 9:] = False
    out = attn(x, mask=mask)[:, :9]
    torch.testing.assert_close(out, attn(x[:, :9]), rtol=1e-5, atol=1e-6)


def test_causal_outputs_ignore_future_keys_even_a_huge_one():
    q, k, v = qkv(n=32, scale=2.0)
    w = draw_projection(64, 16, seed=0)
    base = favor_attention(q, k, v, w, causal=True, chunk_size=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20] *= 6
    k2[:, :, 25:] = torch.randn_like(k2[:, :, 25:]) * 3
    v2[:, :, 20:] = torch.randn_like(v2[:, :, 20:])
    moved = favor_attention(q, k2, v2, w, causal=True, chunk_size=8)
    torch.testing.assert_close(moved[:, :, :20], base[:, :, :20], rtol=0, atol=1e-6)
    assert (moved[:, :, 20:] - base[:, :, 20:]).abs().max() > 1e-2
    # the peer's global key max lets the future key rescale (and underflow) past outputs
    peer = peer_fast_attention(w, causal=True)
    leak = (peer(q, k2, v) - peer(q, k, v))[:, :, :20].abs().max()
    assert leak > 1e-3


def test_one_huge_key_does_not_collapse_the_head():
    q, k, v = qkv(n=24, scale=1.0)
    k[:, :, 5] *= 12  # |k̂|²/2 dominates its own log-features; softmax barely notices it
    w = draw_projection(128, 16, seed=0)
    want = reference(q, k, v, w).float()
    torch.testing.assert_close(favor_attention(q, k, v, w), want, rtol=1e-4, atol=1e-4)
    peer = peer_fast_attention(w)(q, k, v)  # their max ignores -|k̂|²/2: every feature -> ε
    assert (peer - want).abs().max() > 0.1


def test_large_query_norms_do_not_underflow():
    """Pretrained-model norms: exp(-|q̂|²/2) underflows; dropping it (it cancels) is exact."""
    q, k, v = qkv(n=24)
    q = q / q.norm(dim=-1, keepdim=True) * 60  # |q̂|²/2 = 450
    w = draw_projection(128, 16, seed=0)
    want = reference(q, k, v, w).float()
    torch.testing.assert_close(favor_attention(q, k, v, w), want, rtol=1e-4, atol=1e-4)
    peer = peer_fast_attention(w)(q, k, v)  # φ(q) underflows to ε·1: the query is ignored
    torch.testing.assert_close(peer, peer[:, :, :1].expand_as(peer))
    assert (peer - want).abs().max() > 0.1


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_autocast_at_large_norms_is_finite_and_close(dtype, causal):
    attn = PerformerAttention(64, 4, nb_features=64, causal=causal, seed=0)
    with torch.no_grad():
        attn.q_proj.weight.mul_(40)
        attn.kv_proj.weight[:64].mul_(40)  # keys
    x = torch.randn(2, 32, 64)
    want = attn(x)
    with torch.autocast("cpu", dtype=dtype):
        got = attn(x)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().mean() < 0.05 * want.abs().mean() + 0.02


# -- decoding and rotary --------------------------------------------------------------------------
@pytest.mark.parametrize("rotary", [None, RotaryMode.QUERY_KEY, RotaryMode.NUMERATOR])
@pytest.mark.parametrize("fmap", [PositiveFeatures(), HyperbolicFeatures(), GeneralizedFeatures()],
                         ids=repr)
def test_step_equals_parallel_causal(rotary, fmap):
    extra = {} if rotary is None else dict(positional=StubRotary(), rotary=rotary)
    attn = PerformerAttention(32, 2, nb_features=16, causal=True, seed=3, feature_map=fmap,
                              **extra).double()
    x = torch.randn(2, 10, 32, dtype=F64)
    want = attn(x)
    state = None
    for t in range(10):
        out, state = attn.step(x[:, t : t + 1], state)
        torch.testing.assert_close(out, want[:, t : t + 1], rtol=1e-9, atol=1e-10)


def test_rotary_query_key_mode_rotates_before_features():
    pe = StubRotary()
    attn = PerformerAttention(32, 2, nb_features=16, seed=0, positional=pe).double()
    q, k, v = qkv(n=8, dtype=F64)
    pos = torch.arange(8)
    got = attn.attend(q, k, v, key_padding_mask=None, attn_mask=None, q_positions=pos,
                      k_positions=pos)
    rq, rk = pe(q, k, pos, pos)
    torch.testing.assert_close(got, favor_attention(rq, rk, v, attn.projection))


@pytest.mark.parametrize("causal", [False, True])
def test_rotary_numerator_only_matches_su_eq19_and_is_shift_invariant(causal):
    pe = StubRotary()
    attn = PerformerAttention(32, 2, nb_features=16, seed=0, causal=causal, positional=pe,
                              rotary=RotaryMode.NUMERATOR, chunk_size=3).double()
    q, k, v = qkv(n=8, dtype=F64)
    pos = torch.arange(8)

    def run(p):
        return attn.attend(q, k, v, key_padding_mask=None, attn_mask=None, q_positions=p,
                           k_positions=p)

    def rot(fq, fk):
        return pe.rotate(fq, pos, dim=16), pe.rotate(fk, pos, dim=16)

    want = reference(q, k, v, attn.projection, causal=causal, rotate=rot)
    torch.testing.assert_close(run(pos), want)
    torch.testing.assert_close(run(pos + 37), want)  # relative: (R_i a)ᵀ(R_j b) = aᵀR_(j-i)b


def test_encoder_with_performer_and_rotary_trains():
    cfg = EncoderConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, causal=True,
                        attention=functools.partial(PerformerAttention, nb_features=16),
                        positional=StubRotary())
    enc = Encoder(cfg)
    x = torch.randn(2, 9, 32, requires_grad=True)
    enc(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    w = [layer.attention.projection for layer in enc.layers]
    assert not torch.equal(w[0], w[1])  # seed=None: one seed per layer from torch's generator


def test_with_the_real_rotary_embedding_both_modes():
    from transformer_zoo import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=16)
    x = torch.randn(2, 9, 32, dtype=F64)
    for mode in RotaryMode:
        attn = PerformerAttention(32, 2, nb_features=16, causal=True, seed=0, positional=rope,
                                  rotary=mode).double()
        want = attn(x)
        state = None
        for t in range(9):
            out, state = attn.step(x[:, t : t + 1], state)
        torch.testing.assert_close(out, want[:, -1:])
    shifted = attn(x, positions=torch.arange(9) + 50)  # numerator-only form: relative, exact
    torch.testing.assert_close(shifted, want)


# -- errors named before torch's ------------------------------------------------------------------
def test_step_checks_dtype_like_forward_and_works_in_fp64():
    attn = PerformerAttention(32, 2, nb_features=8, causal=True, seed=0)
    x = torch.randn(1, 1, 32, dtype=F64)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the parameters are "
                                        r"torch.float32"):
        attn.step(x)
    with pytest.raises(TypeError, match="floating-point"):
        attn.step(torch.ones(1, 1, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="FavorState"):
        attn.step(x.float(), state=(1, 2))
    out, state = attn.double().step(x)  # a module in fp64 decodes fp64
    assert out.dtype == F64 and state.numerator.dtype == F64


def test_decode_step_names_a_wrong_projection_or_state():
    from transformer_zoo.functional import favor_decode_step

    q = torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match=r"projection: expected \(nb_features, head_dim=16\), "
                                         r"got \(8, 12\)"):
        favor_decode_step(q, q, q, draw_projection(8, 12, seed=0))
    with pytest.raises(ValueError, match="projection: expected a 2-D tensor"):
        favor_decode_step(q, q, q, torch.randn(8))
    _, state = favor_decode_step(q, q, q, draw_projection(8, 16, seed=0))
    with pytest.raises(ValueError, match=r"state.numerator: expected \(1, 2, 16, 16\)"):
        favor_decode_step(q, q, q, draw_projection(16, 16, seed=0), state)
