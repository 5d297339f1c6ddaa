"""RoPE kernels: the rotation's algebra (relative property, norm, identity), both layouts and
the permutation between them, precision in fp32/bf16, gradients, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_zoo import RotaryEmbedding
from transformer_zoo.functional.rotary import (
    RotaryLayout,
    apply_rotary,
    apply_rotary_angles,
    exact_rotary_angles,
    ntk_scaled_base,
    permute_rotary_weight,
    rotary_angles,
    rotary_frequencies,
    rotary_permutation,
    rotary_reference,
)
from transformer_zoo.functional.rotary_phase import phase_angles_fp64, phase_table

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
    angle is the exact one rounded once to fp32 (≤ 2.4e-7 rad), whatever m and n."""
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


def exact_angle(p: int, i: int, r: int, base: float, s: float = 1.0, theta=None):
    """Slow reference (mpmath, 60 digits): (p/s)·θ_i mod 2π with θ_i = base^(−2i/r) the real
    number (or the given ``theta``, taken as exact)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        t = mpmath.power(mpmath.mpf(base), -mpmath.mpf(2 * i) / r) if theta is None else (
            mpmath.mpf(theta))
        return (mpmath.mpf(p) / mpmath.mpf(s) * t) % (2 * mpmath.pi)


def assert_correctly_rounded(got: torch.Tensor, positions, r, base, s=1.0, thetas=None):
    """Every fp32 angle is within half an fp32 ulp (+1e-11 rad) of the exact angle, measured
    around the circle: the fp32 rounding of the exact value."""
    mpmath = pytest.importorskip("mpmath")
    got = got.reshape(len(positions), r // 2).double().tolist()
    for row, p in zip(got, positions, strict=True):
        for i, g in enumerate(row):
            exact = exact_angle(p, i, r, base, s, None if thetas is None else thetas[i])
            with mpmath.workdps(60):
                d = (mpmath.mpf(g) - exact) % (2 * mpmath.pi)
                d = float(min(d, 2 * mpmath.pi - d))
            half_ulp = 0.5 * float(np.spacing(np.float32(float(exact))))
            assert d <= half_ulp + 1e-11, (p, i, g, float(exact), d)


INT64 = st.integers(-(2**63), 2**63 - 1)
BASES = st.sampled_from([10000.0, 500000.0, 1e6, 500.0, 2.0, 123456.789])


@settings(max_examples=60, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=4), st.integers(1, 32), BASES,
       st.sampled_from([1.0, 2.0, 3.5, 8.0]))
def test_angles_exact_at_every_int64_position(positions, half, base, s):
    """The issue's property, over random int64 positions, widths, bases and interpolation
    factors s: the fp32 angles of ``apply_rotary``'s path (``exact_rotary_angles``),
    ``RotaryEmbedding.angles`` and ``rotary_angles`` with extended frequencies are the correctly
    rounded (p/s)·base^(−2i/r) mod 2π. (Before: 5e-6 rad off at 2^36, 0.7 rad at 2^53.)"""
    r = 2 * half
    pos = torch.tensor(positions)
    extended = rotary_frequencies(r, base=base, extended=True)
    got = rotary_angles(pos, extended, interpolation_factor=s)
    assert got.dtype == torch.float32 and ((got >= 0) & (got <= 2 * math.pi + 1e-6)).all()
    assert_correctly_rounded(got, positions, r, base, s)
    rope = RotaryEmbedding(head_dim=r, base=base, interpolation_factor=s)
    torch.testing.assert_close(rope.angles(pos), got, rtol=0, atol=0)
    torch.testing.assert_close(exact_rotary_angles(pos, r, base, s), got, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0, 1, -1, 2**21 - 1, 2**21, -(2**21), 2**42 - 1, 2**42,
                               -(2**42) - 1, 2**53 + 1, 2**62, 2**63 - 1, -(2**63)])
def test_angles_exact_at_chunk_boundaries(p):
    """The 21-bit split at its edges (and both ends of int64), batched positions too."""
    r, base = 64, 10000.0
    got = rotary_angles(torch.tensor([p]), rotary_frequencies(r, base=base, extended=True))
    assert_correctly_rounded(got, [p], r, base)
    batched = exact_rotary_angles(torch.tensor([[p, 0]]), r, base, 1.0)  # (b, 1, n, r/2)
    assert batched.shape == (1, 1, 2, r // 2)
    torch.testing.assert_close(batched[0, 0, 0], got[0], rtol=0, atol=0)


@pytest.mark.cpu_only
@settings(max_examples=30, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=3), st.integers(1, 16), st.integers(0, 2**32))
def test_plain_fp64_frequencies_are_taken_as_exact(positions, half, seed):
    """``rotary_angles`` with a plain fp64 θ (any values, e.g. a user's own frequencies) is
    exact for those fp64 numbers at every int64 position."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(half, generator=g, dtype=torch.float64) ** 4  # spread over decades
    got = rotary_angles(torch.tensor(positions), theta)
    assert_correctly_rounded(got, positions, 2 * half, 10000.0, thetas=theta.tolist())


@settings(max_examples=25, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=4), BASES)
def test_fp64_angles_before_rounding_are_within_1e_12(positions, base):
    """The fp64 angles the reduction produces (before the single rounding to fp32) are within
    1e-12 rad of the exact ones: the fp32 rounding is correct unless within 1e-12 of a tie."""
    mpmath = pytest.importorskip("mpmath")
    r = 32
    hi, lo = rotary_frequencies(r, base=base, extended=True)
    fine = phase_angles_fp64(torch.tensor(positions), phase_table(hi, lo, 1.0)).tolist()
    for row, p in zip(fine, positions, strict=True):
        for i, g in enumerate(row):
            with mpmath.workdps(60):
                d = (mpmath.mpf(g) - exact_angle(p, i, r, base)) % (2 * mpmath.pi)
                assert float(min(d, 2 * mpmath.pi - d)) <= 1e-12


def test_extended_frequencies_are_the_real_theta():
    """θ_hi is the correctly rounded base^(−2i/r) and θ_hi + θ_lo agrees with it to 1e-30."""
    mpmath = pytest.importorskip("mpmath")
    hi, lo = rotary_frequencies(64, base=10000.0, extended=True).tolist()
    assert hi == rotary_frequencies(64, base=10000.0).tolist()
    with mpmath.workdps(60):
        for i, (h, low) in enumerate(zip(hi, lo, strict=True)):
            exact = mpmath.power(10000, -mpmath.mpf(2 * i) / 64)
            assert h == float(exact)
            assert abs((mpmath.mpf(h) + mpmath.mpf(low)) / exact - 1) < 1e-30


def test_ntk_angles_are_exact_for_the_scaled_base():
    """With NTK the θ_i are those of the fp64 base' that ``ntk_scaled_base`` returns."""
    r, s = 16, 4.0
    scaled = ntk_scaled_base(10000.0, r, s)
    pos = [2**40 + 3, -(2**57) + 11]
    x = torch.zeros(1, 1, 2, r)
    x[..., 0::2] = 1.0  # interleaved pairs (1, 0): the rotated pair is (cos, sin)
    y = apply_rotary(x.double(), torch.tensor(pos), dim=r, ntk_factor=s)
    angles = torch.atan2(y[0, 0, :, 1::2], y[0, 0, :, 0::2]) % (2 * math.pi)
    rope = RotaryEmbedding(head_dim=r, ntk_factor=s)
    assert_correctly_rounded(rope.angles(torch.tensor(pos)), pos, r, scaled)
    torch.testing.assert_close(angles, rope.angles(torch.tensor(pos)).double(), rtol=0,
                               atol=1e-12)


def test_angles_at_nearby_positions_stay_distinct():
    """Positions 1000..1007 give 8 distinct angles (in bf16 they would collapse to 2)."""
    pos = torch.arange(1000, 1008)
    angles = rotary_angles(pos, rotary_frequencies(4))
    assert angles.dtype == torch.float32
    assert angles[:, 0].unique().numel() == 8
    assert ((angles >= 0) & (angles < 2 * math.pi + 1e-6)).all()


def test_rotary_angles_validates_its_inputs():
    theta = rotary_frequencies(8)
    with pytest.raises(ValueError, match=r"\(2, r/2\)"):
        rotary_angles(torch.arange(3), torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="int64"):
        rotary_angles(torch.arange(3, dtype=torch.int32), theta)
    with pytest.raises(ValueError, match="> 0"):
        rotary_angles(torch.arange(3), theta, interpolation_factor=0.0)
