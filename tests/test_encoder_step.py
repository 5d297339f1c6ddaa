"""Incremental decoding: Encoder.prefill/step and MultiHeadAttention.attend_cached against the
parallel forward, for every causal attention x encoding pair the compatibility table allows;
favor_prefill's state against the token-by-token recurrence; padded tokens never enter it."""

from __future__ import annotations

import functools

import pytest
import torch

from transformer_zoo import (
    ALiBi,
    Encoder,
    EncoderConfig,
    LearnedPositionalEncoding,
    PerformerAttention,
    RotaryEmbedding,
    RotaryMode,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    SoftmaxAttention,
    T5RelativeBias,
    supports,
)
from transformer_zoo.attention.kv_cache import KVCache
from transformer_zoo.encoder.encoder import DecodeState
from transformer_zoo.functional.favor_decode import FavorState, favor_decode_step, favor_prefill
from transformer_zoo.functional.random_features import draw_projection

F64 = torch.float64
D, H = 16, 2  # d_model, heads: head_dim 8

ENCODINGS = {  # zero-argument factories: one encoding per layer
    "none": None,
    "sinusoidal": lambda: SinusoidalPositionalEncoding(D),
    "learned": lambda: LearnedPositionalEncoding(64, D),
    "rotary": lambda: RotaryEmbedding(head_dim=D // H),
    "alibi": lambda: ALiBi(n_heads=H, causal=True),
    "t5": lambda: T5RelativeBias(n_heads=H, causal=True, num_buckets=8, max_distance=16),
    "shaw": lambda: ShawRelativePosition(head_dim=D // H, max_distance=4),
}
ATTENTIONS = {
    "softmax": SoftmaxAttention,
    "performer": functools.partial(PerformerAttention, nb_features=12, seed=3),
    "performer-numerator": functools.partial(PerformerAttention, nb_features=12, seed=3,
                                             rotary=RotaryMode.NUMERATOR),
}


def _pairs():
    for a_name, attention in ATTENTIONS.items():
        cls = attention.func if isinstance(attention, functools.partial) else attention
        for e_name, make in ENCODINGS.items():
            if make is not None and not supports(cls, type(make())):
                continue
            if a_name == "performer-numerator" and e_name != "rotary":
                continue  # the numerator form needs a rotary encoding
            yield pytest.param(attention, make, id=f"{a_name}-{e_name}")


def _encoder(attention, make, norm_first=True) -> Encoder:
    torch.manual_seed(0)
    config = EncoderConfig(d_model=D, n_heads=H, n_layers=2, d_ff=24, dropout=0.0,
                           causal=True, attention=attention, positional=make,
                           norm_first=norm_first)
    return Encoder(config).double().eval()


def test_every_causal_pair_is_covered():
    """The list above spans the compatibility table: softmax takes every encoding, Performer
    the rotary and input-added ones (so a new encoding class shows up here)."""
    ids = [p.id for p in _pairs()]
    assert sum(i.startswith("softmax-") for i in ids) == len(ENCODINGS)
    assert {i for i in ids if i.startswith("performer-") and "numerator" not in i} == {
        "performer-none", "performer-sinusoidal", "performer-learned", "performer-rotary"}


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize(("attention", "make"), list(_pairs()))
def test_step_equals_parallel_forward(attention, make, norm_first):
    """prefill(prompt) then one token at a time (and a 3-token chunk) = forward on the whole
    sequence, at every position: rotations, biases and input encodings at the right place."""
    enc = _encoder(attention, make, norm_first)
    x = torch.randn(2, 11, D, dtype=F64)
    full = enc(x)
    out, state = enc.prefill(x[:, :4])
    outs = [out]
    for t in range(4, 8):
        out, state = enc.step(x[:, t:t + 1], state)
        outs.append(out)
    out, state = enc.step(x[:, 8:], state)  # a chunk after the prefill
    outs.append(out)
    assert state.length == 11
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("attention", [ATTENTIONS["softmax"], ATTENTIONS["performer"]])
def test_prefill_with_padding_equals_forward(attention):
    """A padded prompt: padded keys are left out of the cache/state, the later tokens equal the
    forward on the padded sequence, padded outputs are 0."""
    enc = _encoder(attention, ENCODINGS["rotary"])
    x = torch.randn(2, 9, D, dtype=F64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[1, 4] = False
    full = enc(x, mask=keep)
    out, state = enc.prefill(x[:, :6], mask=keep[:, :6])
    outs = [out]
    for t in range(6, 9):
        out, state = enc.step(x[:, t:t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)
    assert torch.equal(outs[0][~keep[:, :6]], torch.zeros_like(outs[0][~keep[:, :6]]))


def test_performer_state_is_constant_size_and_softmax_cache_grows():
    sizes = {}
    for name in ("softmax", "performer"):
        enc = _encoder(ATTENTIONS[name], ENCODINGS["rotary"])
        x = torch.randn(1, 40, D, dtype=F64)
        _, state = enc.prefill(x[:, :2])
        first = state.nbytes()
        for t in range(2, 40):
            _, state = enc.step(x[:, t:t + 1], state)
        sizes[name] = (first, state.nbytes())
        kinds = {type(c) for c in state.caches}
        assert kinds == ({FavorState} if name == "performer" else {KVCache})
    assert sizes["performer"][0] == sizes["performer"][1]
    assert sizes["softmax"][1] == 20 * sizes["softmax"][0]  # 40 tokens vs 2


@pytest.mark.parametrize("name", ["softmax-rotary", "softmax-alibi", "performer-rotary",
                                  "performer-numerator-rotary"])
def test_attention_forward_cached_equals_forward(name):
    """The module-level API alone: default positions advance with the cache."""
    a_name, e_name = name.rsplit("-", 1)
    torch.manual_seed(0)
    attn = ATTENTIONS[a_name](D, H, causal=True, positional=ENCODINGS[e_name]()).double().eval()
    x = torch.randn(2, 9, D, dtype=F64)
    out, cache = attn.forward_cached(x[:, :3])
    outs = [out]
    for t in range(3, 9):
        out, cache = attn.forward_cached(x[:, t:t + 1], cache)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), attn(x), rtol=1e-9, atol=1e-10)


def test_step_errors():
    enc = Encoder(EncoderConfig(d_model=D, n_heads=H, n_layers=1, causal=False))
    with pytest.raises(ValueError, match="causal=True"):
        enc.prefill(torch.randn(1, 3, D))
    enc = _encoder(SoftmaxAttention, None)
    with pytest.raises(TypeError, match="DecodeState"):
        enc.step(torch.randn(1, 1, D, dtype=F64), object())
    _, state = enc.prefill(torch.randn(1, 3, D, dtype=F64))
    assert isinstance(state, DecodeState)
    with pytest.raises(ValueError, match="cannot extend"):
        enc.step(torch.randn(2, 1, D, dtype=F64), state)  # another batch size
    attn = SoftmaxAttention(D, H)
    with pytest.raises(ValueError, match="causal=True"):
        attn.forward_cached(torch.randn(1, 2, D))


# -- the FAVOR+ state itself -------------------------------------------------------------------
def _qkv(b=2, h=2, n=7, d=8, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3)]


@pytest.mark.parametrize("scale", [1.0, 8.0])  # 8: log-features in the hundreds
def test_favor_prefill_state_equals_the_steps(scale):
    """One parallel pass gives the state (and outputs) that n decode steps reach."""
    q, k, v = _qkv(scale=scale)
    w = draw_projection(16, 8, seed=1, dtype=F64)
    out, state = favor_prefill(q, k, v, w)
    stepped, outs = None, []
    for t in range(q.shape[-2]):
        o, stepped = favor_decode_step(q[..., t:t + 1, :], k[..., t:t + 1, :],
                                       v[..., t:t + 1, :], w, stepped)
        outs.append(o)
    torch.testing.assert_close(out, torch.cat(outs, -2), rtol=1e-9, atol=1e-10)
    assert state.length == stepped.length == 7
    torch.testing.assert_close(state.g, stepped.g, rtol=0, atol=0)
    torch.testing.assert_close(state.numerator, stepped.numerator, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(state.denominator, stepped.denominator, rtol=1e-9, atol=1e-12)


def test_padded_tokens_never_enter_the_state():
    """A left-padded prompt (junk at huge norm under the padding) gives the state of the real
    tokens alone; a padded decode step leaves the state unchanged."""
    q, k, v = _qkv(n=6)
    w = draw_projection(16, 8, seed=1, dtype=F64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False
    k, v = k.clone(), v.clone()
    k[0, :, :2], v[0, :, :2] = 1e3, 1e3  # junk
    _, state = favor_prefill(q, k, v, w, key_padding_mask=keep)
    _, alone = favor_prefill(q[:1, :, 2:], k[:1, :, 2:], v[:1, :, 2:], w)
    torch.testing.assert_close(state.numerator[:1], alone.numerator, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(state.g[:1], alone.g, rtol=0, atol=0)
    pad = torch.tensor([[False], [True]])
    _, after = favor_decode_step(q[..., :1, :], k[..., :1, :], v[..., :1, :], w, state,
                                 key_padding_mask=pad)
    assert torch.equal(after.numerator[0], state.numerator[0])
    assert torch.equal(after.g[0], state.g[0])
    assert not torch.equal(after.numerator[1], state.numerator[1])
    # a sample whose prompt is all padding starts empty: its first real token is alone
    none = torch.zeros(2, 6, dtype=torch.bool)
    _, empty = favor_prefill(q, k, v, w, key_padding_mask=none)
    o, _ = favor_decode_step(q[..., :1, :], k[..., :1, :], v[..., :1, :], w, empty)
    torch.testing.assert_close(o, v[..., :1, :], rtol=1e-9, atol=1e-12)  # one key: its value
