"""RoPE kernels: the rotation's algebra (relative property, norm, identity), both layouts and
the permutation between them, precision in fp32/bf16, gradients, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo.functional.rotary import (
    RotaryLayout,
    apply_rotary,
    apply_rotary_angles,
    ntk_scaled_base,
    permute_rotary_weight,
    rotary_angles,
    rotary_frequencies,
    rotary_permutation,
    rotary_reference,
)

LAYOUTS = list(RotaryLayout)


def pair_views(x: torch.Tensor, r: int, layout: RotaryLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members (a, b) of each rotated pair, ``(..., r/2)`` each."""
    if layout is RotaryLayout.INTERLEAVED:
        return x[..., 0:r:2], x[..., 1:r:2]
    return x[..., : r // 2], x[..., r // 2 : r]


def exact_rotated_dot(q, k, m, n, r, base, layout):
    """(R_m q)ᵀ(R_n k) in fp64 from the closed form qᵀ R_(n−m) k (depends on n − m only)."""
    theta = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    delta = (n - m) * theta
    qa, qb = (t.double() for t in pair_views(q, r, layout))
    ka, kb = (t.double() for t in pair_views(k, r, layout))
    rotated = ((qa * ka + qb * kb) * delta.cos() + (qb * ka - qa * kb) * delta.sin()).sum(-1)
    return rotated + (q[..., r:].double() * k[..., r:].double()).sum(-1)


@pytest.mark.parametrize("layout", LAYOUTS)
@given(
    m=st.integers(0, 100_000),
    n=st.integers(0, 100_000),
    half=st.integers(1, 16),
    extra=st.integers(0, 4),
)
def test_relative_property_fp32(layout, m, n, half, extra):
    """<R_m q, R_n k> = qᵀ R_(n−m) k for fp32 q, k and m, n up to 1e5, to fp32 rounding: every
    angle is within ~4e-7 rad (fp64 angle, reduced mod 2π, then rounded), whatever m and n."""
    r, w = 2 * half, 2 * half + extra
    q, k = torch.randn(1, 1, 1, w), torch.randn(1, 1, 1, w)
    rq = apply_rotary(q, torch.tensor([m]), dim=r, layout=layout)
    rk = apply_rotary(k, torch.tensor([n]), dim=r, layout=layout)
    ours = (rq.double() * rk.double()).sum(-1)
    exact = exact_rotated_dot(q, k, m, n, r, 10000.0, layout)
    bound = 4e-6 * (q.norm() * k.norm()).item()  # angle + cos/sin + product rounding
    assert (ours - exact).abs().item() <= bound


@pytest.mark.parametrize("layout", LAYOUTS)
@given(p=st.integers(-100_000, 100_000), half=st.integers(1, 32), extra=st.integers(0, 3))
def test_norm_preserved(layout, p, half, extra):
    x = torch.randn(2, 3, 4, 2 * half + extra)
    y = apply_rotary(x, torch.full((4,), p), dim=2 * half, layout=layout)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[..., 2 * half :], x[..., 2 * half :], rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_position_zero_is_identity(layout, dtype):
    x = torch.randn(2, 3, 5, 16, dtype=dtype)
    y = apply_rotary(x, torch.zeros(5, dtype=torch.int64), dim=12, layout=layout)
    assert y.dtype == dtype
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@given(half=st.integers(1, 16), extra=st.integers(0, 3), batched=st.booleans())
def test_fast_paths_match_reference(layout, dtype, half, extra, batched):
    """The eager fast paths (complex multiply / one-buffer half-split) equal the plain formula."""
    b, n = 2, 6
    x = torch.randn(b, 3, n, 2 * half + extra, dtype=dtype)
    pos = torch.randint(-5000, 50_000, (b, n) if batched else (n,))
    angles = rotary_angles(pos, rotary_frequencies(2 * half))
    fast = apply_rotary_angles(x, angles, layout=layout)
    ref = rotary_reference(x.double(), angles.double(), layout=layout)
    tol = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 3e-2}[dtype]
    assert fast.dtype == dtype and fast.shape == x.shape
    torch.testing.assert_close(fast.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_and_odd_offsets(layout):
    base = torch.randn(2, 5, 3, 21)
    x = base.transpose(1, 2)[..., 1:]  # (2, 3, 5, 20), odd storage offset, odd strides
    pos = torch.arange(5) * 37
    ref = apply_rotary(x.contiguous(), pos, dim=16, layout=layout)
    torch.testing.assert_close(apply_rotary(x, pos, dim=16, layout=layout), ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_positions_and_packed_resets(layout):
    """(b, n) positions rotate each row by its own positions; a reset (packed sequences)
    rotates the second document exactly as if it stood alone."""
    x = torch.randn(2, 2, 7, 8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    y = apply_rotary(x, pos, dim=8, layout=layout)
    for i in range(2):
        torch.testing.assert_close(y[i : i + 1], apply_rotary(x[i : i + 1], pos[i], dim=8,
                                                               layout=layout))
    alone = apply_rotary(x[:1, :, 4:], torch.arange(3), dim=8, layout=layout)
    torch.testing.assert_close(y[:1, :, 4:], alone)


@pytest.mark.parametrize("source", LAYOUTS)
@given(heads=st.integers(1, 3), half=st.integers(1, 6), extra=st.integers(0, 2))
def test_layouts_agree_under_weight_permutation(source, heads, half, extra):
    """Attention logits are identical when the q/k projection rows are permuted between
    layouts (the Meta -> HF Llama conversion)."""
    target = RotaryLayout.HALF_SPLIT if source is RotaryLayout.INTERLEAVED else (
        RotaryLayout.INTERLEAVED)
    r, d, d_in, n = 2 * half, 2 * half + extra, 5, 6
    w_q, w_k = torch.randn(heads * d, d_in), torch.randn(heads * d, d_in)
    b_q = torch.randn(heads * d)
    x = torch.randn(1, n, d_in)
    pos = torch.randint(0, 1000, (n,))
    kw = dict(n_heads=heads, head_dim=d, rotary_dim=r, source=source, target=target)

    def logits(wq, bq, wk, layout):
        q = (x @ wq.T + bq).view(1, n, heads, d).transpose(1, 2)
        k = (x @ wk.T).view(1, n, heads, d).transpose(1, 2)
        q, k = (apply_rotary(t, pos, dim=r, layout=layout) for t in (q, k))
        return q @ k.transpose(-1, -2)

    expected = logits(w_q, b_q, w_k, source)
    moved = logits(permute_rotary_weight(w_q, **kw), permute_rotary_weight(b_q, **kw),
                   permute_rotary_weight(w_k, **kw), target)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-4)


def test_permutation_round_trip_and_known_order():
    to_half = rotary_permutation(6, source=RotaryLayout.INTERLEAVED, target=RotaryLayout.HALF_SPLIT)
    assert to_half.tolist() == [0, 2, 4, 1, 3, 5]
    back = rotary_permutation(6, source=RotaryLayout.HALF_SPLIT, target=RotaryLayout.INTERLEAVED)
    assert to_half[back].tolist() == list(range(6))
    w = torch.randn(8, 3)
    kw = dict(n_heads=2, head_dim=4)
    there = permute_rotary_weight(w, source=RotaryLayout.INTERLEAVED,
                                  target=RotaryLayout.HALF_SPLIT, **kw)
    again = permute_rotary_weight(there, source=RotaryLayout.HALF_SPLIT,
                                  target=RotaryLayout.INTERLEAVED, **kw)
    torch.testing.assert_close(again, w, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p0", [4096, 60_000])
def test_bf16_far_positions_stay_close_to_fp32(layout, p0):
    """Positions are never rounded to bf16: at p >= 4096 the bf16 result stays within bf16
    rounding of the fp32 one (a position rounded to bf16 would be off by up to 16 steps)."""
    x = torch.randn(1, 4, 64, 64)
    pos = p0 + torch.arange(64)
    ref = apply_rotary(x, pos, dim=64, layout=layout)
    low = apply_rotary(x.bfloat16(), pos, dim=64, layout=layout).float()
    assert (low - ref).abs().max().item() < 0.05
    assert (low - ref).abs().mean().item() < 0.01


def test_interpolation_and_ntk():
    x = torch.randn(1, 2, 6, 16)
    pos = torch.arange(0, 12, 2)
    torch.testing.assert_close(
        apply_rotary(x, pos, dim=16, interpolation_factor=2.0),
        apply_rotary(x, pos // 2, dim=16),
        rtol=0, atol=0,
    )
    assert ntk_scaled_base(10000.0, 16, 1.0) == 10000.0
    assert ntk_scaled_base(10000.0, 16, 4.0) == pytest.approx(10000.0 * 4.0 ** (16 / 14))
    torch.testing.assert_close(
        apply_rotary(x, pos, dim=16, ntk_factor=4.0),
        apply_rotary(x, pos, dim=16, base=10000.0 * 4.0 ** (16 / 14)),
    )
    # NTK keeps the highest frequency θ_0 = 1 and slows the lowest one by exactly s
    theta = rotary_frequencies(16, base=ntk_scaled_base(10000.0, 16, 4.0))
    plain = rotary_frequencies(16)
    assert theta[0].item() == 1.0
    assert (plain[-1] / theta[-1]).item() == pytest.approx(4.0, rel=1e-5)


def test_frequencies():
    theta = rotary_frequencies(8, base=10000.0)
    assert theta.dtype == torch.float64
    expected = [10000.0 ** (-2 * i / 8) for i in range(4)]
    assert theta.tolist() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout):
    x = torch.randn(1, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([0, 7, 300])
    fn = lambda t: apply_rotary(t, pos, dim=4, layout=layout)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_reference_grad(layout):
    x = torch.randn(2, 2, 5, 8, requires_grad=True)
    g = torch.randn(2, 2, 5, 8)
    angles = rotary_angles(torch.arange(5) * 11, rotary_frequencies(6))
    (apply_rotary_angles(x, angles, layout=layout) * g).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    (rotary_reference(x, angles, layout=layout) * g).sum().backward()
    torch.testing.assert_close(fast, x.grad)


def test_validation():
    x = torch.randn(1, 2, 3, 8)
    pos = torch.arange(3)
    with pytest.raises(ValueError, match="even"):
        apply_rotary(x, pos, dim=5)
    with pytest.raises(ValueError, match="at most the 8 channels"):
        apply_rotary(x, pos, dim=10)
    with pytest.raises(TypeError, match="RotaryLayout"):
        apply_rotary(x, pos, dim=8, layout="half_split")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int64"):
        apply_rotary(x, pos.float(), dim=8)
    with pytest.raises(ValueError, match=r"\(seq,\) = \(3,\)"):
        apply_rotary(x, torch.arange(4), dim=8)
    with pytest.raises(ValueError, match="4-D"):
        apply_rotary(x[0], pos, dim=8)
    with pytest.raises(ValueError, match=">= 1"):
        apply_rotary(x, pos, dim=8, interpolation_factor=0.5)
    with pytest.raises(ValueError, match="rows"):
        permute_rotary_weight(torch.randn(7, 3), n_heads=2, head_dim=4,
                              source=RotaryLayout.INTERLEAVED, target=RotaryLayout.HALF_SPLIT)


def test_angles_are_exact_to_fp32_rounding_at_any_position():
    """Angles come from int64 positions via fp64, reduced mod 2π, then rounded to fp32:
    positions 1000..1007 stay distinct (in bf16 they would collapse to 2 values) and even at
    p = 10^7 or 2^31 cos/sin match the fp64 value to ~1e-6 (fp32 angles would be off by ~1)."""
    pos = torch.arange(1000, 1008)
    angles = rotary_angles(pos, rotary_frequencies(4))
    assert angles.dtype == torch.float32
    assert angles[:, 0].unique().numel() == 8
    assert ((angles >= 0) & (angles < 2 * math.pi + 1e-6)).all()
    far = torch.tensor([10**5, 10**7, 2**31, -(10**7)])
    theta = rotary_frequencies(64)
    got = rotary_angles(far, theta)
    for i, p in enumerate(far.tolist()):
        for j in (0, 1, 17, 31):
            exact = p * theta[j].item()
            assert abs(math.cos(got[i, j].item()) - math.cos(exact)) < 2e-6
            assert abs(math.sin(got[i, j].item()) - math.sin(exact)) < 2e-6
