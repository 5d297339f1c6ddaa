"""Exact RoPE angles p·θ mod 2π for every int64 position p (any |p| < 2^63).

An fp64 product p·θ keeps 53 bits; p·θ mod 2π needs the bits of p·θ below the units, so at
|p| = 2^40 only ~12 fractional bits are left (~1e-4 rad) and at 2^53 none. Here angles are
computed in turns (p·φ mod 1 with φ = θ/(2π s), s the interpolation factor) from

    p = a·2^42 + b·2^21 + c,   c, b ∈ [0, 2^21),  a ∈ [−2^21, 2^21)      (exact int64 split)
    p·φ ≡ a·T₂ + b·T₁ + c·T₀  (mod 1),   T_j = frac(2^(21j)·φ) = q_j + r_j

with a precomputed table per frequency: q_j a multiple of 2^-30 (so every product chunk·q_j and
their sum are exact fp64 numbers, whatever the summation order or FMA use) and r_j = T_j − q_j,
|r_j| < 2^-29. Per position it is one (r, 3) @ (…, 3, n) matmul and five elementwise ops; the
fp64 angle is within 1e-12 rad of the exact value, so its fp32 rounding is correct.

φ must itself be known to ~2^-104 relative (an error of θ·2^-53 is 500 rad at p = 2^62): the
table is built from θ as a double-double θ_hi + θ_lo (the built-in frequencies come from
Python's ``decimal`` with 60 digits, so θ_i = base^(−2i/r) is the real number; a plain fp64 θ
counts as exact) and 1/(2π s) as a double-double, with error-free products of 26/27-bit
pieces (split by masking mantissa bits, not Veltkamp's multiply, so FMA contraction cannot
break it).

Shapes: θ ``(r/2,)``; table ``(3, r)`` fp64, row j = [q_j | r_j]; positions int64 ``(n,)`` or
``(b, n)``; angles fp32 ``(..., n, r/2)``.
"""

from __future__ import annotations

import decimal
import functools
import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_scalar

_CHUNK = 21  # bits per position chunk: 3 chunks cover int64
_FIXED = 2.0**30  # q_j are multiples of 2^-30: chunk (≤ 2^21) · q_j (< 2^30 units) < 2^51
_TWO_PI = decimal.Decimal(
    "6.28318530717958647692528676655900576839433879875021164194988918461563281257"
)
_PRECISION = decimal.Context(prec=60)


def _split26(x: float) -> tuple[float, float]:
    """x = top + rest with top having 26 significant bits and rest ≤ 27 (both exact)."""
    mantissa, exponent = math.frexp(x)
    top = math.ldexp(math.floor(mantissa * 2**26), exponent - 26)
    return top, x - top


def frequencies_double_double(dim: int, base: float) -> tuple[tuple[float, ...], ...]:
    """θ_i = base^(−2i/dim) as (hi, lo) tuples: hi correctly rounded, hi + lo to ~2^-106.

    Python-only work, a constant under torch.compile; ``guard_scalar`` turns a dim or base that
    dynamo made symbolic (a module attribute that changed between compiles) back into a number,
    with a guard on its value."""
    return _frequencies_constant(guard_scalar(dim), guard_scalar(base))


@torch.compiler.assume_constant_result
def _frequencies_constant(dim: int, base: float) -> tuple[tuple[float, ...], ...]:
    return _frequencies_double_double(dim, float(base))


@functools.lru_cache(maxsize=256)
def _frequencies_double_double(dim: int, base: float) -> tuple[tuple[float, ...], ...]:
    ctx = _PRECISION
    log_base = ctx.ln(decimal.Decimal(base))  # Decimal(float) is the float's exact value
    his, los = [], []
    for i in range(dim // 2):
        theta = ctx.exp(ctx.multiply(log_base, ctx.divide(-2 * i, dim)))
        hi = float(theta)
        his.append(hi)
        los.append(float(ctx.subtract(theta, decimal.Decimal(hi))))
    return tuple(his), tuple(los)


@torch.compiler.assume_constant_result
def _inverse_turn(interpolation_factor: float) -> tuple[float, float, float, float]:
    """1/(2π s) = hi + lo (double-double), and hi = top + rest split 26/27 bits."""
    return _inverse_turn_cached(interpolation_factor)


@functools.lru_cache(maxsize=64)
def _inverse_turn_cached(interpolation_factor: float) -> tuple[float, float, float, float]:
    ctx = _PRECISION
    c = ctx.divide(1, ctx.multiply(_TWO_PI, decimal.Decimal(float(interpolation_factor))))
    hi = float(c)
    lo = float(ctx.subtract(c, decimal.Decimal(hi)))
    return (hi, lo, *_split26(hi))


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """s + e = a + b exactly, s = fl(a + b) (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def phase_table(theta: Tensor, theta_lo: Tensor | None, interpolation_factor: float) -> Tensor:
    """The (3, r) fp64 table [q_j | r_j] of frac(2^(21j)·(θ + θ_lo)/(2π s)) for θ ``(r/2,)``."""
    c_hi, c_lo, c_top, c_rest = _inverse_turn(guard_scalar(interpolation_factor))
    t = theta.to(torch.float64)
    t_top = (t.view(torch.int64) & ~((1 << 27) - 1)).view(torch.float64)  # 26 bits
    t_rest = t - t_top  # 27 bits, exact
    # φ = θ·c as a double-double (hi, lo): the three big partial products are exact
    hi, err = _two_sum(t_top * c_top, t_top * c_rest)
    hi, err2 = _two_sum(hi, t_rest * c_top)
    err = err + err2 + t_rest * c_rest + t * c_lo
    if theta_lo is not None:
        err = err + theta_lo.to(torch.float64) * c_hi
    hi, lo = _two_sum(hi, err)
    rows = []
    for j in range(3):
        x_hi, x_lo = hi * 2.0 ** (_CHUNK * j), lo * 2.0 ** (_CHUNK * j)  # exact scalings
        frac = x_hi - x_hi.floor()  # exact; the turn count 2^(21j)·φ mod 1 is frac + x_lo
        q = ((frac + x_lo) * _FIXED).floor() / _FIXED
        r = (frac - q) + x_lo  # exact: both sums are short
        rows.append(torch.cat((q - q.floor(), r)))  # q folded into [0, 1): T_j mod 1 unchanged
    return torch.stack(rows)  # (3, r)


def phase_angles(positions: Tensor, table: Tensor) -> Tensor:
    """Angles p·θ/s mod 2π in [0, 2π), fp32 ``(..., n, r/2)`` from int64 positions ``(..., n)``
    and a ``phase_table``: the fp64 angle, rounded once."""
    angles = phase_angles_fp64(positions, table)
    return angles.to(torch.float32, memory_format=torch.contiguous_format)


def phase_angles_fp64(positions: Tensor, table: Tensor) -> Tensor:
    """The fp64 angles before rounding, ``(..., n, r/2)`` (a transposed view)."""
    half = table.shape[-1] // 2
    mask = (1 << _CHUNK) - 1
    p = positions
    chunks = torch.stack((p & mask, (p >> _CHUNK) & mask, p >> (2 * _CHUNK)), dim=-2)
    # (r, 3) @ (..., 3, n) -> (..., r, n): rows [Σ c q | Σ c r], each half one contiguous block
    turns = table.to(p.device).mT @ chunks.to(torch.float64)
    whole = turns[..., :half, :].frac_().add_(turns[..., half:, :])  # exact integer part dropped
    whole.sub_(whole.floor())  # [0, 1)
    return whole.mul_(2 * math.pi).transpose(-1, -2)  # (..., n, r/2)
