"""RotaryEmbedding module: the QKTransform contract, the Performer ``rotate(dim=...)`` contract,
caching (per device, never persisted, never stale), compile-friendliness, attention use."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo import RotaryEmbedding, RotaryLayout, SoftmaxAttention
from transformer_zoo.functional.rotary import apply_rotary, ntk_scaled_base

LAYOUTS = list(RotaryLayout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_is_rotate_of_each(layout):
    rope = RotaryEmbedding(head_dim=16, rotary_dim=12, layout=layout, base=500.0)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16)  # GQA: fewer key heads
    qp, kp = torch.arange(5) + 3, torch.arange(7)
    rq, rk = rope(q, k, qp, kp)
    torch.testing.assert_close(rq, rope.rotate(q, qp), rtol=0, atol=0)
    torch.testing.assert_close(rk, rope.rotate(k, kp), rtol=0, atol=0)
    torch.testing.assert_close(rq, apply_rotary(q, qp, dim=12, base=500.0, layout=layout))
    # self-attention: one positions tensor, the angles are shared; same result
    same = torch.randn(2, 2, 5, 16)
    sq, sk = rope(q, same, qp, qp)
    torch.testing.assert_close(sq, rope.rotate(q, qp), rtol=0, atol=0)
    torch.testing.assert_close(sk, rope.rotate(same, qp), rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@given(dim_half=st.integers(1, 12), extra=st.integers(0, 5), m=st.integers(0, 5000),
       n=st.integers(0, 5000))
def test_rotate_with_dim_for_random_features(layout, dim_half, extra, m, n):
    """``rotate(x, p, dim=r)`` rotates the first r of w features with θ_i = base'^(−2i/r)
    (base' after NTK, positions after interpolation); the rotated numerator
    φ(q)ᵀR_(n−m)φ(k) depends only on n − m while the plain denominator is untouched."""
    rope = RotaryEmbedding(head_dim=8, layout=layout, interpolation_factor=2.0, ntk_factor=3.0)
    r, w = 2 * dim_half, 2 * dim_half + extra
    phi_q, phi_k = torch.rand(1, 1, 1, w), torch.rand(1, 1, 1, w)  # positive features
    got = rope.rotate(phi_q, torch.tensor([2 * m]), dim=r)
    want = apply_rotary(phi_q, torch.tensor([m]), dim=r, base=ntk_scaled_base(10000.0, 8, 3.0),
                        layout=layout)
    torch.testing.assert_close(got, want)
    shift = 1000
    num = (rope.rotate(phi_q, torch.tensor([m]), dim=r)
           * rope.rotate(phi_k, torch.tensor([n]), dim=r)).sum()
    num_shifted = (rope.rotate(phi_q, torch.tensor([m + shift]), dim=r)
                   * rope.rotate(phi_k, torch.tensor([n + shift]), dim=r)).sum()
    torch.testing.assert_close(num, num_shifted, rtol=1e-4, atol=1e-4)


def test_no_state_and_read_only_options():
    rope = RotaryEmbedding(head_dim=8)
    assert rope.state_dict() == {}
    assert list(rope.buffers()) == [] and list(rope.parameters()) == []
    with pytest.raises(AttributeError):
        rope.base = 5.0  # type: ignore[misc]
    q = torch.randn(1, 1, 3, 8)
    rope.rotate(q, torch.arange(3))
    rope.rotate(q, torch.arange(3), dim=4)  # a second width: tables cached outside the module
    assert rope.state_dict() == {} and not vars(rope)["_buffers"]
    clone = pickle.loads(pickle.dumps(rope))
    torch.testing.assert_close(clone.rotate(q, torch.arange(3)), rope.rotate(q, torch.arange(3)))
    deep = copy.deepcopy(rope)
    assert deep.extra_repr() == rope.extra_repr()


def test_cache_never_stale_across_dtypes():
    rope = RotaryEmbedding(head_dim=8)
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    pos = torch.arange(4) * 1000
    first = rope.rotate(x, pos)
    low = rope.rotate(x.bfloat16(), pos)
    again = rope.rotate(x, pos)
    assert low.dtype == torch.bfloat16 and again.dtype == torch.float64
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    rope.half()  # no parameters or buffers: nothing to cast, nothing goes stale
    torch.testing.assert_close(rope.rotate(x, pos), first, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiles_without_graph_breaks(layout):
    rope = RotaryEmbedding(head_dim=8, rotary_dim=6, layout=layout)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    pos = torch.arange(5) + 40
    compiled = torch.compile(rope, fullgraph=True, backend="eager")
    got = compiled(q, k, pos, pos)
    want = rope(q, k, pos, pos)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_validation():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(head_dim=8, rotary_dim=3)
    with pytest.raises(ValueError, match="at most head_dim=8"):
        RotaryEmbedding(head_dim=8, rotary_dim=10)
    with pytest.raises(TypeError, match="RotaryLayout"):
        RotaryEmbedding(head_dim=8, layout="interleaved")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        RotaryEmbedding(head_dim=8, ntk_factor=0.0)
    with pytest.raises(ValueError, match="> 1"):
        RotaryEmbedding(head_dim=8, base=1.0)
    with pytest.raises(TypeError):
        RotaryEmbedding(8)  # type: ignore[misc]  # keyword-only
    rope = RotaryEmbedding(head_dim=8)
    with pytest.raises(ValueError, match="head_dim=8"):
        rope.rotate(torch.randn(1, 1, 3, 10), torch.arange(3))
    attn = SoftmaxAttention(32, 2, positional=rope)  # head_dim 16 != 8
    with pytest.raises(ValueError, match="head_dim=8"):
        attn(torch.randn(1, 3, 32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_with_offsets_and_left_padding(layout):
    """Left padding with positions that start at each row's first real token gives the same
    outputs at real tokens as the unpadded sequence."""
    attn = SoftmaxAttention(32, 4, positional=RotaryEmbedding(head_dim=8, layout=layout)).eval()
    x = torch.randn(1, 5, 32)
    pad = torch.randn(1, 3, 32)
    padded = torch.cat((pad, x), dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    got = attn(padded, mask=mask, positions=positions)[:, 3:]
    torch.testing.assert_close(got, attn(x), rtol=1e-5, atol=1e-5)
