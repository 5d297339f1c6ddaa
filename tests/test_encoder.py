"""The reference encoder: equivariance, padding invariance, causality, gradients, options."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    FeedForward,
    LearnedPositionalEncoding,
    LogitBias,
    Place,
    SinusoidalPositionalEncoding,
    SoftmaxAttention,
    SwiGLUFeedForward,
)

F64 = torch.float64


def build(**kw) -> Encoder:
    options = dict(d_model=16, n_heads=4, n_layers=2, d_ff=24, dropout=0.0)
    options.update(kw)
    return Encoder(EncoderConfig(**options)).double().eval()


variants = st.fixed_dictionaries({
    "norm_first": st.booleans(),
    "feedforward": st.sampled_from([FeedForward, SwiGLUFeedForward]),
})


@given(variants, st.integers(1, 3), st.integers(1, 7), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_shapes_and_padded_outputs_are_zero(kw, b, n, masked, seed):
    torch.manual_seed(seed)
    enc = build(**kw)
    x = torch.randn(b, n, 16, dtype=F64)
    keep = torch.rand(b, n) < 0.7 if masked else None
    out = enc(x, mask=keep)
    assert out.shape == (b, n, 16) and torch.isfinite(out).all()
    if masked:
        assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))


@given(variants, st.integers(1, 7), st.booleans(), st.integers(0, 2**31 - 1))
def test_permutation_equivariance_without_positional_encoding(kw, n, masked, seed):
    """f(Px) = P f(x), with the padding mask permuted along."""
    torch.manual_seed(seed)
    enc = build(**kw)
    x = torch.randn(2, n, 16, dtype=F64)
    keep = torch.rand(2, n) < 0.7 if masked else None
    perm = torch.randperm(n)
    out_perm = enc(x[:, perm], mask=None if keep is None else keep[:, perm])
    torch.testing.assert_close(out_perm, enc(x, mask=keep)[:, perm], rtol=1e-9, atol=1e-10)


positionals = st.sampled_from(["none", "sinusoidal", "learned", "bias"])


def positional(kind: str):
    return {
        "none": None,
        "sinusoidal": SinusoidalPositionalEncoding(16),
        "learned": LearnedPositionalEncoding(32, 16),
        "bias": lambda: DistanceBias(),  # a factory: one per layer
    }[kind]


@given(variants, positionals, st.booleans(), st.integers(1, 6), st.integers(1, 5),
       st.sampled_from([0.0, 1.0, 1e4]), st.integers(0, 2**31 - 1))
def test_padding_invariance(kw, pe, causal, n, pad, junk_scale, seed):
    """Appending padded positions of any content leaves the real outputs unchanged."""
    torch.manual_seed(seed)
    enc = build(positional=positional(pe), causal=causal, **kw)
    x = torch.randn(2, n, 16, dtype=F64)
    keep = torch.rand(2, n) < 0.8
    keep[:, 0] = True
    xp = torch.cat([x, junk_scale * torch.randn(2, pad, 16, dtype=F64)], 1)
    keep_p = torch.cat([keep, torch.zeros(2, pad, dtype=torch.bool)], 1)
    torch.testing.assert_close(enc(xp, mask=keep_p)[:, :n], enc(x, mask=keep),
                               rtol=1e-9, atol=1e-10)


@given(variants, positionals, st.integers(2, 4), st.integers(1, 6),
       st.integers(0, 2**31 - 1))
def test_batch_independence(kw, pe, b, n, seed):
    torch.manual_seed(seed)
    enc = build(positional=positional(pe), **kw)
    x = torch.randn(b, n, 16, dtype=F64)
    keep = torch.rand(b, n) < 0.8
    full = enc(x, mask=keep)
    for i in range(b):
        torch.testing.assert_close(full[i: i + 1], enc(x[i: i + 1], mask=keep[i: i + 1]),
                                   rtol=1e-10, atol=1e-12)


@given(variants, positionals, st.integers(2, 7), st.integers(0, 6),
       st.integers(0, 2**31 - 1))
def test_causality(kw, pe, n, t, seed):
    """With causal=True, changing tokens after t leaves outputs up to t unchanged."""
    t = t % (n - 1)
    torch.manual_seed(seed)
    enc = build(positional=positional(pe), causal=True, **kw)
    x = torch.randn(1, n, 16, dtype=F64)
    y = x.clone()
    y[:, t + 1:] = 5 * torch.randn_like(y[:, t + 1:])
    out_x, out_y = enc(x), enc(y)
    torch.testing.assert_close(out_x[:, : t + 1], out_y[:, : t + 1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out_x[:, t + 1:], out_y[:, t + 1:])


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("feedforward", [FeedForward, SwiGLUFeedForward])
def test_gradcheck_one_layer_encoder(norm_first, feedforward):
    enc = build(d_model=8, n_heads=2, n_layers=1, d_ff=8, norm_first=norm_first,
                feedforward=feedforward, positional=SinusoidalPositionalEncoding(8))
    x = torch.randn(2, 3, 8, dtype=F64, requires_grad=True)
    keep = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.autograd.gradcheck(lambda x: enc(x, mask=keep), (x,))


def test_post_norm_and_pre_norm_layouts():
    """Post-norm ends each block in LayerNorm; pre-norm has a final LayerNorm instead."""
    x = torch.randn(2, 5, 16, dtype=F64)
    post = build(norm_first=False)
    assert post.final_norm is None
    out = post(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 5, dtype=F64),
                               atol=1e-4, rtol=0)
    pre = build(norm_first=True)
    assert isinstance(pre.final_norm, torch.nn.LayerNorm)
    layer = pre.layers[0]
    h = x + layer.attention(layer.norm1(x))  # the pre-norm recurrence by hand
    h = h + layer.feedforward(layer.norm2(h))
    torch.testing.assert_close(layer(x, mask=None, positions=torch.arange(5)), h)


def test_feedforward_formulas():
    x = torch.randn(3, 4, 8, dtype=F64)
    gelu = FeedForward(8, 12).double()
    want = F.gelu(x @ gelu.fc1.weight.T + gelu.fc1.bias) @ gelu.fc2.weight.T + gelu.fc2.bias
    torch.testing.assert_close(gelu(x), want)
    swi = SwiGLUFeedForward(8, 12).double()
    a, u = x @ swi.gate.weight.T, x @ swi.up.weight.T
    torch.testing.assert_close(swi(x), (a * torch.sigmoid(a) * u) @ swi.down.weight.T)
    assert swi.gate.bias is None and swi.up.bias is None and swi.down.bias is None


def test_input_encoding_is_added_once_before_the_first_layer():
    pe = SinusoidalPositionalEncoding(16)
    with_pe, without = build(positional=pe), build()
    without.load_state_dict(with_pe.state_dict())
    x = torch.randn(2, 5, 16, dtype=F64)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 2, 4, 6, 8]])
    want = without(x + pe(positions).double())
    torch.testing.assert_close(with_pe(x, positions=positions), want)
    assert all(layer.attention.positional is None for layer in with_pe.layers)


class DistanceBias(LogitBias):
    """Toy learned bias -softplus(w) · |i - j|, one scalar per instance."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, q, q_positions, k_positions):
        dist = (q_positions[..., :, None] - k_positions[..., None, :]).abs()  # (.., n, m)
        bias = -F.softplus(self.w) * dist.to(q.dtype)
        return bias[None, None] if bias.ndim == 2 else bias[:, None]


def test_positional_factory_gives_one_per_layer_instance_is_shared():
    per_layer = build(n_layers=3, positional=DistanceBias)
    encodings = [layer.attention.positional for layer in per_layer.layers]
    assert len({id(e) for e in encodings}) == 3
    shared = DistanceBias()
    one = build(n_layers=3, positional=shared)
    assert all(layer.attention.positional is shared for layer in one.layers)
    assert sum(p.numel() for p in one.parameters()) + 2 == sum(
        p.numel() for p in per_layer.parameters()
    )


def test_attention_factory_with_partial():
    seen = []

    def factory(d_model, n_heads, **kw):
        seen.append(kw)
        return SoftmaxAttention(d_model, n_heads, bias=False, **kw)

    enc = build(attention=functools.partial(factory), attention_dropout=0.25, causal=True)
    assert seen[0] == {"dropout": 0.25, "causal": True, "positional": None}
    assert enc.layers[0].attention.q_proj.bias is None


class InputOnlyAttention(SoftmaxAttention):
    accepts = frozenset({Place.INPUT})


def test_incompatible_pair_raises_at_construction():
    with pytest.raises(ValueError, match="InputOnlyAttention cannot use DistanceBias"):
        build(attention=InputOnlyAttention, positional=DistanceBias)
    build(attention=InputOnlyAttention, positional=SinusoidalPositionalEncoding(16))


def test_dropout_active_only_in_training():
    enc = build(dropout=0.3)
    x = torch.randn(1, 6, 16, dtype=F64)
    torch.testing.assert_close(enc(x), enc(x))
    enc.train()
    assert not torch.allclose(enc(x), enc(x))
