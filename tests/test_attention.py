"""MultiHeadAttention plumbing and SoftmaxAttention: shapes, oracles and invariances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from transformer_zoo import (
    LogitBias,
    MultiHeadAttention,
    Place,
    QKTransform,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    SoftmaxAttention,
    check_pair,
    compatibility_table,
)

F64 = torch.float64


def make(d_model=16, n_heads=4, **kw) -> SoftmaxAttention:
    return SoftmaxAttention(d_model, n_heads, **kw).double().eval()


def slow_module_reference(attn: SoftmaxAttention, x, context=None, keep=None):
    """out_proj(concat_h softmax(q_h k_hᵀ/√d, masked) v_h), written with explicit loops."""
    context = x if context is None else context
    b, n, _ = x.shape
    m = context.shape[1]
    h, d = attn.n_heads, attn.head_dim
    q = attn.q_proj(x)  # (b, n, h·d)
    kv = attn.kv_proj(context)  # (b, m, 2·h·d)
    k, v = kv[..., : h * d], kv[..., h * d:]
    heads = torch.zeros(b, n, h * d, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            cols = slice(hi * d, (hi + 1) * d)
            logits = q[bi, :, cols] @ k[bi, :, cols].T / math.sqrt(d)  # (n, m)
            allowed = torch.ones(n, m, dtype=torch.bool)
            if attn.causal:
                allowed &= torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
            if keep is not None:
                allowed &= keep[bi][None, :]
            w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            w = torch.nan_to_num(w)  # rows with no key -> 0
            heads[bi, :, cols] = w @ v[bi, :, cols]
    return attn.out_proj(heads)


@given(
    b=st.integers(1, 3),
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    n_heads=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(1, 5),
    kv_dim=st.integers(1, 9),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cross_attention_shapes_and_reference(b, n, m, n_heads, head_dim, kv_dim, causal,
                                              masked, seed):
    torch.manual_seed(seed)
    d_model = 2 * n_heads
    attn = make(d_model, n_heads, head_dim=head_dim, kv_dim=kv_dim, causal=causal)
    x, c = torch.randn(b, n, d_model, dtype=F64), torch.randn(b, m, kv_dim, dtype=F64)
    keep = (torch.rand(b, m) < 0.7) if masked else None
    out = attn(x, context=c, mask=keep)
    assert out.shape == (b, n, d_model)
    torch.testing.assert_close(out, slow_module_reference(attn, x, c, keep),
                               rtol=1e-10, atol=1e-12)


@given(b=st.integers(1, 3), n=st.integers(1, 7), n_heads=st.sampled_from([1, 2, 4]),
       causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_self_attention_equals_torch_multihead_attention(b, n, n_heads, causal, seed):
    """Copying our weights into nn.MultiheadAttention gives the same outputs (incl. padding)."""
    torch.manual_seed(seed)
    d_model = 4 * n_heads
    ours = make(d_model, n_heads, causal=causal)
    theirs = nn.MultiheadAttention(d_model, n_heads, batch_first=True).double().eval()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(b, n, d_model, dtype=F64)
    keep = torch.rand(b, n) < 0.7
    keep[:, 0] = True  # older torch gives NaN for rows with no key; ours 0 (test_softmax)
    future = torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None
    # torch's boolean masks mean True = masked out, ours True = may attend
    ref = theirs(x, x, x, key_padding_mask=~keep, attn_mask=future, need_weights=False)[0]
    torch.testing.assert_close(ours(x, mask=keep), ref, rtol=1e-10, atol=1e-12)


@given(b=st.integers(2, 4), n=st.integers(1, 6), causal=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_batch_independence(b, n, causal, seed):
    torch.manual_seed(seed)
    attn = make(causal=causal)
    x = torch.randn(b, n, 16, dtype=F64)
    keep = torch.rand(b, n) < 0.8
    full = attn(x, mask=keep)
    for i in range(b):
        alone = attn(x[i: i + 1], mask=keep[i: i + 1])
        torch.testing.assert_close(full[i: i + 1], alone, rtol=1e-12, atol=1e-12)


@given(n=st.integers(2, 8), t=st.integers(0, 7), seed=st.integers(0, 2**31 - 1))
def test_causality(n, t, seed):
    """Changing tokens after position t leaves outputs up to t unchanged."""
    t = t % (n - 1)
    torch.manual_seed(seed)
    attn = make(causal=True)
    x = torch.randn(2, n, 16, dtype=F64)
    y = x.clone()
    y[:, t + 1:] = 10 * torch.randn_like(y[:, t + 1:])
    out_x, out_y = attn(x), attn(y)
    torch.testing.assert_close(out_x[:, : t + 1], out_y[:, : t + 1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out_x[:, t + 1:], out_y[:, t + 1:])


@given(n=st.integers(1, 6), pad=st.integers(1, 4), scale=st.sampled_from([0.0, 1.0, 1e3]),
       seed=st.integers(0, 2**31 - 1))
def test_padding_invariance(n, pad, scale, seed):
    """Appending padded keys of any content leaves every query's output unchanged."""
    torch.manual_seed(seed)
    attn = make()
    x = torch.randn(2, n, 16, dtype=F64)
    junk = scale * torch.randn(2, pad, 16, dtype=F64)
    xp = torch.cat([x, junk], 1)
    keep = torch.cat([torch.ones(2, n, dtype=torch.bool), torch.zeros(2, pad, dtype=torch.bool)], 1)
    torch.testing.assert_close(attn(xp, mask=keep)[:, :n], attn(x), rtol=1e-10, atol=1e-12)


@given(n=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_permutation_equivariance_without_positions(n, seed):
    torch.manual_seed(seed)
    attn = make()
    x = torch.randn(2, n, 16, dtype=F64)
    keep = torch.rand(2, n) < 0.7
    perm = torch.randperm(n)
    torch.testing.assert_close(attn(x[:, perm], mask=keep[:, perm]), attn(x, mask=keep)[:, perm],
                               rtol=1e-10, atol=1e-12)


def test_attn_mask_combines_with_padding_and_causal():
    attn = make(causal=True)
    x = torch.randn(2, 5, 16, dtype=F64)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    extra = torch.rand(5, 5) < 0.7
    extra.fill_diagonal_(True)
    combined = keep[:, None, None, :] & extra & torch.ones(5, 5, dtype=torch.bool).tril()
    plain = make(causal=False)
    plain.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x, mask=keep, attn_mask=extra),
                               plain(x, attn_mask=combined.expand(2, 4, 5, 5)))


@pytest.mark.cpu_only
@pytest.mark.parametrize("shaw", [False, True])  # Shaw's value term takes the explicit path
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape", [(), (5,), (1,), (4, 5), (4, 1), (4, 1, 5), (1, 4, 5), (2, 1, 4, 5), (2, 4, 4, 5)],
    ids=str,
)
def test_attn_mask_of_every_rank_equals_the_expanded_mask(shape, causal, shaw):
    """(b, h, n, m) = (2, 4, 4, 5): every rank 0..4 broadcasts with trailing dims aligned."""
    g = torch.Generator().manual_seed(len(shape))
    pe = ShawRelativePosition(head_dim=4, max_distance=3) if shaw else None
    attn = make(causal=causal, positional=pe)
    x, c = torch.randn(2, 4, 16, generator=g, dtype=F64), torch.randn(2, 5, 16, generator=g,
                                                                       dtype=F64)
    pads = (None, torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool))
    masks = (torch.rand(shape, generator=g) < 0.6, torch.zeros(shape, dtype=torch.bool))
    for keep in pads:
        for allowed in masks:
            out = attn(x, context=c, mask=keep, attn_mask=allowed)
            full = allowed.expand(2, 4, 4, 5).contiguous()
            want = attn(x, context=c, mask=keep, attn_mask=full)
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
            assert torch.isfinite(out).all()


def test_attend_receives_a_4d_attn_mask():
    seen = []

    class Probe(SoftmaxAttention):
        def attend(self, q, k, v, *, attn_mask, **kw):
            seen.append(None if attn_mask is None else tuple(attn_mask.shape))
            return super().attend(q, k, v, attn_mask=attn_mask, **kw)

    probe, x = Probe(16, 4), torch.randn(2, 3, 16)
    for shape in [(), (3,), (3, 3), (4, 1, 3)]:
        probe(x, attn_mask=torch.ones(shape, dtype=torch.bool))
    assert seen == [(1, 1, 1, 1), (1, 1, 1, 3), (1, 1, 3, 3), (1, 4, 1, 3)]


def test_head_dim_decoupled_from_d_model():
    attn = make(10, 3, head_dim=7)
    assert attn.q_proj.weight.shape == (21, 10) and attn.kv_proj.weight.shape == (42, 10)
    assert attn(torch.randn(2, 4, 10, dtype=F64)).shape == (2, 4, 10)


def test_dropout_is_training_only():
    attn = SoftmaxAttention(16, 4, dropout=0.5)
    x = torch.randn(1, 12, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_no_projection_bias():
    attn = SoftmaxAttention(16, 4, bias=False)
    assert all(p.bias is None for p in (attn.q_proj, attn.kv_proj, attn.out_proj))
    assert "n_heads=4" in repr(attn)


# -- positional encodings acting inside attention -------------------------------------------


class ShiftBias(LogitBias):
    """Toy bias: -c · |i - j| (ALiBi-like), a value term optional."""

    def __init__(self, c: float, value: bool = False) -> None:
        super().__init__()
        self.c = c
        self.value = value

    @property
    def has_value_term(self) -> bool:  # type: ignore[override]
        return self.value

    def forward(self, q, q_positions, k_positions):
        return -self.c * (q_positions[:, None] - k_positions[None, :]).abs().to(q.dtype)[None, None]

    def value_term(self, weights, q_positions, k_positions):
        # Σ_j α_ij (j - i) on every feature: a readable value-side term
        rel = (k_positions[None, :] - q_positions[:, None]).to(weights.dtype)  # (n, m)
        return (weights * rel).sum(-1, keepdim=True).expand(*weights.shape[:3], 4)


class ZeroKeys(QKTransform):
    """Toy transform: k -> 0, so every query attends uniformly."""

    def forward(self, q, k, q_positions, k_positions):
        return q, torch.zeros_like(k)


def test_logit_bias_and_value_term_are_applied():
    x = torch.randn(1, 5, 16, dtype=F64)
    base = make()
    pos = torch.arange(5)
    for value in (False, True):
        attn = make(positional=ShiftBias(0.7, value=value).double())
        attn.load_state_dict(base.state_dict(), strict=False)
        q = base.q_proj(x).view(1, 5, 4, 4).transpose(1, 2)
        k, v = base.kv_proj(x).view(1, 5, 2, 4, 4).permute(2, 0, 3, 1, 4)
        bias = -0.7 * (pos[:, None] - pos[None, :]).abs().to(F64)
        w = torch.softmax(q @ k.transpose(-1, -2) / 2 + bias, -1)  # (1, h, n, m)
        heads = w @ v
        if value:
            heads = heads + (w * (pos[None, :] - pos[:, None])).sum(-1, keepdim=True)
        want = base.out_proj(heads.transpose(1, 2).reshape(1, 5, 16))
        torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-12)


def test_qk_transform_is_applied():
    attn = make(positional=ZeroKeys())
    x = torch.randn(2, 6, 16, dtype=F64)
    v = attn.kv_proj(x)[..., 16:]  # (b, n, h·d)
    torch.testing.assert_close(attn(x), attn.out_proj(v.mean(1, keepdim=True).expand(2, 6, 16)))


class InputOnlyAttention(SoftmaxAttention):
    accepts = frozenset({Place.INPUT})
    supports_causal = False


def test_incompatible_positional_raises_naming_the_pair():
    with pytest.raises(ValueError, match="InputOnlyAttention cannot use ShiftBias.*'bias'"):
        InputOnlyAttention(16, 4, positional=ShiftBias(1.0))
    with pytest.raises(ValueError, match="InputOnlyAttention does not support causal"):
        InputOnlyAttention(16, 4, causal=True)
    with pytest.raises(TypeError, match="expected a transformer_zoo PositionalEncoding"):
        check_pair(SoftmaxAttention, nn.Identity())  # type: ignore[arg-type]
    check_pair(InputOnlyAttention, SinusoidalPositionalEncoding(16))  # no error


def test_compatibility_table_reads_the_declarations():
    table = compatibility_table([SoftmaxAttention, InputOnlyAttention],
                                [SinusoidalPositionalEncoding, ShiftBias, ZeroKeys])
    lines = table.splitlines()
    assert lines[0] == "| encoding | acts on | SoftmaxAttention | InputOnlyAttention |"
    assert lines[2] == "| SinusoidalPositionalEncoding | input | yes | yes |"
    assert lines[3] == "| ShiftBias | bias | yes | no |"
    assert lines[4] == "| ZeroKeys | qk | yes | no |"
    assert lines[5] == "| (causal=True) | mask | yes | no |"


def test_base_class_has_no_kernel():
    with pytest.raises(NotImplementedError):
        MultiHeadAttention(8, 2)(torch.randn(1, 3, 8))


class RecordPositions(QKTransform):
    """Toy transform that records the positions it is given and leaves q, k alone."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, q, k, q_positions, k_positions):
        self.seen.append((q_positions, k_positions))
        return q, k


def test_positions_reach_the_encoding():
    rec = RecordPositions()
    attn = make(positional=rec)
    x, c = torch.randn(2, 3, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64)
    attn(x)  # self-attention: keys share the query positions, default arange(n)
    attn(x, positions=torch.tensor([[4, 5, 6], [7, 8, 9]]))
    attn(x, context=c)  # cross-attention: keys default to arange(m)
    attn(x, context=c, positions=torch.tensor([1, 2, 3]), context_positions=torch.arange(5) + 9)
    (q0, k0), (q1, k1), (q2, k2), (q3, k3) = rec.seen
    assert q0.tolist() == k0.tolist() == [0, 1, 2]
    assert q1.tolist() == k1.tolist() == [[4, 5, 6], [7, 8, 9]]
    assert q2.tolist() == [0, 1, 2] and k2.tolist() == [0, 1, 2, 3, 4]
    assert q3.tolist() == [1, 2, 3] and k3.tolist() == [9, 10, 11, 12, 13]
