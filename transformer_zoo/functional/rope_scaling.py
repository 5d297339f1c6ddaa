"""RoPE length extension: the per-dimension frequencies θ'_i and the attention factor.

Each scheme rescales θ_i = base^(−2i/r) (i = 0 … r/2 − 1) per dimension, θ'_i = g_i·θ_i, and
may multiply cos/sin (so q and k each, so the logits by its square) by an attention factor:

- YaRN (Peng, Quesnelle, Fan, Shippole 2023, arXiv 2309.00071, §3.2 "NTK-by-parts" and
  eq. 22 temperature): with r(i) the ramp clamp((i − lo)/(hi − lo), 0, 1),
  g_i = r(i)/s + (1 − r(i)); lo/hi = r·ln(L₀/(2πβ))/(2 ln base) for β = β_fast / β_slow
  (floor/ceil when ``truncate``, clipped to [0, r − 1], as HF). Attention factor
  0.1·ln s + 1 (or mscale(s, mscale)/mscale(s, mscale_all_dim), DeepSeek's form).
- Dynamic NTK (emozilla 2023): base' = base·(s·L/L₀ − (s − 1))^(r/(r−2)) at the current length
  L > L₀ (L₀ = max_position_embeddings), base below.
- Llama 3.1 (Meta 2024): wavelength λ_i = 2π/θ_i; g_i = 1 for λ_i < L₀/high_freq_factor,
  1/s for λ_i > L₀/low_freq_factor, else (1 − σ)/s + σ with σ = (L₀/λ_i − low)/(high − low).
- LongRoPE (Ding et al. 2024, arXiv 2402.13753): g_i = 1/f_i with given factors f (the short
  ones up to L₀, the long ones beyond); attention factor √(1 + ln s / ln L₀).

Every θ'_i here is the real number g_i·θ_i for the float parameters given (θ_i from 60-digit
``decimal``, g_i in ``decimal``; the thresholds lo/hi and base' are the fp64 numbers HF also
computes), returned correctly rounded to fp64, or as the double-double (hi, lo) the exact
int64 angle machinery (``rotary_phase``) needs. Transformers' ``ROPE_INIT_FUNCTIONS`` compute the
same θ'_i in fp32: they agree to fp32 rounding (tests/test_rope_scaling.py).

Shapes: r rotated channels; frequencies ``(r/2,)`` fp64, or ``(2, r/2)`` with ``extended``.
"""

from __future__ import annotations

import decimal
import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int
from transformer_zoo.functional.rotary_phase import frequencies_double_double
from transformer_zoo.functional.rotary_theta import _check_even_dim, _check_factor, _wide

_CTX = decimal.Context(prec=60)
_TWO_PI = decimal.Decimal(
    "6.28318530717958647692528676655900576839433879875021164194988918461563281257"
)
Frequencies = tuple[tuple[float, ...], tuple[float, ...]]  # (θ_hi, θ_lo)


def _check_number(value: object, name: str, *, minimum: float = 0.0, strict: bool = True
                  ) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and math.isfinite(value) and (value > minimum if strict else value >= minimum):
        return float(value)
    relation = ">" if strict else ">="
    raise ValueError(f"{name}: expected a finite number {relation} {minimum:g}, got {value!r}")


def _check_base(base: object) -> float:
    return _check_number(base, "base", minimum=1.0)


def _real_theta(dim: int, base: float) -> list[decimal.Decimal]:
    hi, lo = frequencies_double_double(dim, base)
    D = decimal.Decimal
    return [_CTX.add(D(h), D(lo_)) for h, lo_ in zip(hi, lo, strict=True)]


def _split(values: Sequence[decimal.Decimal]) -> Frequencies:
    his = tuple(float(v) for v in values)
    los = tuple(float(_CTX.subtract(v, decimal.Decimal(h)))
                for v, h in zip(values, his, strict=True))
    return his, los


def _as_tensor(freqs: Frequencies, extended: bool, device: torch.device | str | None) -> Tensor:
    return torch.tensor(freqs if extended else freqs[0], dtype=_wide(device), device=device)


# -- YaRN -----------------------------------------------------------------------------------
def yarn_correction_range(
    dim: int, *, base: float, original_max_position_embeddings: int, beta_fast: float = 32.0,
    beta_slow: float = 1.0, truncate: bool = True,
) -> tuple[float, float]:
    """(lo, hi): the dimensions where the frequency turns β_fast / β_slow times over L₀,
    d(β) = r·ln(L₀/(2πβ))/(2 ln base), floor/ceil if ``truncate``, clipped to [0, r − 1]
    (HF's ``find_correction_range``, fp64)."""
    def at(rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))
                ) / (2 * math.log(base))

    lo, hi = at(beta_fast), at(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    return max(lo, 0), min(hi, dim - 1)


@functools.lru_cache(maxsize=128)
def _yarn(dim: int, base: float, factor: float, original: int, beta_fast: float,
          beta_slow: float, truncate: bool) -> Frequencies:
    lo, hi = yarn_correction_range(dim, base=base, original_max_position_embeddings=original,
                                   beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)
    if lo == hi:
        hi += 0.001  # HF: "prevent singularity"
    d_lo, s = decimal.Decimal(lo), decimal.Decimal(factor)
    d_width = _CTX.subtract(decimal.Decimal(hi), d_lo)
    out = []
    for i, theta in enumerate(_real_theta(dim, base)):
        ramp = min(max(_CTX.divide(_CTX.subtract(decimal.Decimal(i), d_lo), d_width), 0), 1)
        g = _CTX.add(_CTX.divide(ramp, s), _CTX.subtract(1, ramp))  # ramp 1: θ/s, 0: θ
        out.append(_CTX.multiply(theta, g))
    return _split(out)


def yarn_frequencies(
    dim: int, *, base: float = 10000.0, factor: float, original_max_position_embeddings: int,
    beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
    device: torch.device | str | None = None, extended: bool = False,
) -> Tensor:
    """YaRN's θ'_i = (r(i)/s + 1 − r(i))·base^(−2i/r): interpolated (θ/s) below the β_slow
    dimension, untouched above β_fast, a linear ramp between. fp64 ``(r/2,)``, or the
    ``(2, r/2)`` double-double with ``extended``."""
    args = _check_yarn(dim, base, factor, original_max_position_embeddings, beta_fast,
                       beta_slow, truncate)
    return _as_tensor(_yarn(*args), extended, device)


def _check_yarn(dim, base, factor, original, beta_fast, beta_slow, truncate) -> tuple:
    _check_even_dim(dim)
    check_positive_int(original, "original_max_position_embeddings")
    beta_fast = _check_number(beta_fast, "beta_fast")
    beta_slow = _check_number(beta_slow, "beta_slow")
    if beta_fast < beta_slow:
        raise ValueError(f"beta_fast: expected >= beta_slow={beta_slow:g}, got {beta_fast:g}")
    if not isinstance(truncate, bool):
        raise TypeError(f"truncate: expected a bool, got {truncate!r}")
    return (dim, _check_base(base), _check_factor(factor, "factor"), original, beta_fast,
            beta_slow, truncate)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1·mscale·ln s + 1 for s > 1, else 1 (YaRN eq. 22's √(1/t); DeepSeek's ``mscale``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(
    factor: float, *, mscale: float | None = None, mscale_all_dim: float | None = None
) -> float:
    """The factor on cos/sin: mscale(s, mscale)/mscale(s, mscale_all_dim) when both are given
    (and non-zero, as HF reads them), else 0.1·ln s + 1."""
    factor = _check_factor(factor, "factor")
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


# -- dynamic NTK ----------------------------------------------------------------------------
def dynamic_ntk_base(
    base: float, dim: int, *, factor: float, seq_len: int, max_position_embeddings: int
) -> float:
    """base·(s·L/L₀ − (s − 1))^(r/(r−2)) with L = max(seq_len, L₀) (so base itself up to L₀),
    fp64 as HF computes it."""
    _check_even_dim(dim)
    base, factor = _check_base(base), _check_factor(factor, "factor")
    length = max(int(seq_len), int(max_position_embeddings))
    if length == max_position_embeddings or dim == 2:
        return base
    return base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (
        dim / (dim - 2))


# -- Llama 3.1 ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def _llama3(dim: int, base: float, factor: float, low: float, high: float, original: int
            ) -> Frequencies:
    s, length = decimal.Decimal(factor), decimal.Decimal(original)
    low_wavelen = _CTX.divide(length, decimal.Decimal(low))
    high_wavelen = _CTX.divide(length, decimal.Decimal(high))
    out = []
    for theta in _real_theta(dim, base):
        wavelen = _CTX.divide(_TWO_PI, theta)
        if wavelen < high_wavelen:  # high frequency: kept
            g = decimal.Decimal(1)
        elif wavelen > low_wavelen:  # low frequency: interpolated
            g = _CTX.divide(1, s)
        else:  # between: a smooth mix
            smooth = _CTX.divide(_CTX.subtract(_CTX.divide(length, wavelen), decimal.Decimal(low)),
                                 decimal.Decimal(high) - decimal.Decimal(low))
            g = _CTX.add(_CTX.divide(_CTX.subtract(1, smooth), s), smooth)
        out.append(_CTX.multiply(theta, g))
    return _split(out)


def llama3_frequencies(
    dim: int, *, base: float = 500000.0, factor: float = 8.0, low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0, original_max_position_embeddings: int = 8192,
    device: torch.device | str | None = None, extended: bool = False,
) -> Tensor:
    """Llama 3.1's θ'_i: wavelengths 2π/θ_i shorter than L₀/high_freq_factor keep θ_i, longer
    than L₀/low_freq_factor get θ_i/s, in between (1 − σ)θ_i/s + σθ_i. fp64 ``(r/2,)``."""
    return _as_tensor(_llama3(*_check_llama3(dim, base, factor, low_freq_factor,
                                             high_freq_factor, original_max_position_embeddings)),
                      extended, device)


def _check_llama3(dim, base, factor, low, high, original) -> tuple:
    _check_even_dim(dim)
    check_positive_int(original, "original_max_position_embeddings")
    low = _check_number(low, "low_freq_factor")
    high = _check_number(high, "high_freq_factor")
    if not high > low:
        raise ValueError(f"high_freq_factor: expected > low_freq_factor={low:g}, got {high:g}")
    return dim, _check_base(base), _check_factor(factor, "factor"), low, high, original


# -- LongRoPE -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def _longrope(dim: int, base: float, factors: tuple[float, ...]) -> Frequencies:
    thetas = _real_theta(dim, base)
    return _split([_CTX.divide(t, decimal.Decimal(f))
                   for t, f in zip(thetas, factors, strict=True)])


def check_longrope_factors(factors: object, dim: int, name: str) -> tuple[float, ...]:
    """The per-frequency factors as a tuple of r/2 positive floats (ValueError otherwise)."""
    if isinstance(factors, Tensor):
        factors = factors.tolist()
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name}: expected a sequence of {dim // 2} numbers, got {factors!r}")
    if len(factors) != dim // 2:
        raise ValueError(
            f"{name}: expected {dim // 2} factors (one per rotated pair, r={dim}), got "
            f"{len(factors)}"
        )
    return tuple(_check_number(f, f"{name}[{i}]") for i, f in enumerate(factors))


def longrope_frequencies(
    dim: int, *, base: float = 10000.0, factors: Sequence[float],
    device: torch.device | str | None = None, extended: bool = False,
) -> Tensor:
    """LongRoPE's θ'_i = base^(−2i/r)/f_i for the given r/2 factors (short or long)."""
    _check_even_dim(dim)
    factors = check_longrope_factors(factors, dim, "factors")
    return _as_tensor(_longrope(dim, _check_base(base), factors), extended, device)


def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    """√(1 + ln s / ln L₀) for s > 1, else 1 (HF / Phi-3's default)."""
    factor = _check_number(factor, "factor")
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))
