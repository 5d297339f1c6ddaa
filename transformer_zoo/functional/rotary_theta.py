"""RoPE frequencies and angles: θ_i, NTK-aware base, and the angles (p/s)·θ_i mod 2π.

    θ_i = base^(−2i/r),  i = 0 … r/2 − 1;   angle_i(p) = (p/s)·θ_i mod 2π   in [0, 2π)

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv 2104.09864, eq. 15. Extensions: linear position interpolation (Chen et al. 2023, arXiv
2306.15595) divides positions by s; NTK-aware scaling (bloc97, 2023) replaces base by
base·s^(r/(r−2)). The rotation that uses these angles is in ``rotary``.

Precision: angles p·θ_i/s mod 2π are computed exactly from the int64 positions (split into
three 21-bit chunks against a per-frequency table of turns, ``rotary_phase``) to within ~1e-12
rad, for every |p| < 2^63, and only then rounded to fp32, so each fp32 angle is the correctly
rounded exact angle (error ≤ half an fp32 ulp: ≤ 2.4e-7 rad in [0, 2π)). θ_i = base^(−2i/r) is
the real number (carried as a double-double from 60-digit ``decimal``; base is the float given,
after NTK the fp64 number ``ntk_scaled_base`` returns), and p/s is exact. fp32 angles (HF,
torchtune) are off by up to |p θ_i|·2^-24, 0.006 rad at p = 10^5; a plain fp64 product p·θ_i
mod 2π (this library before) by 5e-6 rad at 2^36 and 0.7 rad at 2^53. MPS has no fp64 and
stays in fp32 (p·θ_i in fp32, exact only for small p). Positions are never rounded to the
input dtype (rotary-embedding-torch builds them in it: in bf16 positions above 256 collide).

Per-dimension frequencies (the length extensions of ``rope_scaling``: YaRN, Llama 3.1,
LongRoPE, dynamic NTK) go through ``exact_angles_for_frequencies`` with their θ'_i given as
double-doubles: the same exactness for those real numbers.

Shapes: b batch, n length, r rotated channels; positions int64 ``(n,)`` or ``(b, n)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int, check_tensor
from transformer_zoo.functional.rotary_phase import (
    frequencies_double_double,
    phase_angles,
    phase_table,
)


def _check_even_dim(dim: object, name: str = "dim") -> int:
    check_positive_int(dim, name)
    if dim % 2:  # type: ignore[operator]
        raise ValueError(f"{name}: rotary needs an even number of channels, got {dim}")
    return dim  # type: ignore[return-value]


def _check_factor(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1.0:
        raise ValueError(f"{name}: expected a number >= 1, got {value!r}")
    return float(value)


def ntk_scaled_base(base: float, dim: int, ntk_factor: float) -> float:
    """NTK-aware base: base·s^(r/(r−2)) (s = ``ntk_factor``, r = ``dim``; r = 2 keeps base)."""
    _check_even_dim(dim)
    _check_factor(ntk_factor, "ntk_factor")
    if ntk_factor == 1.0 or dim == 2:
        return float(base)
    return float(base) * ntk_factor ** (dim / (dim - 2))


def _wide(device: torch.device | str | None) -> torch.dtype:
    """fp64 where the device has it (everything but MPS)."""
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


def rotary_frequencies(
    dim: int,
    *,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    extended: bool = False,
) -> Tensor:
    """θ_i = base^(−2i/dim), i = 0 … dim/2 − 1, ``(dim/2,)`` in fp64 (fp32 on MPS), correctly
    rounded. ``extended=True``: ``(2, dim/2)``, rows θ_hi (the same) and θ_lo, the rest of the
    real θ_i to ~2^-106 relative — what ``rotary_angles`` needs to be exact at |p| > 2^31."""
    _check_even_dim(dim)
    if not float(base) > 1.0:
        raise ValueError(f"base: expected a number > 1, got {base!r}")
    hi, lo = frequencies_double_double(dim, float(base))
    return torch.tensor((hi, lo) if extended else hi, dtype=_wide(device), device=device)


def rotary_angles(
    positions: Tensor, inv_freq: Tensor, *, interpolation_factor: float = 1.0
) -> Tensor:
    """Angles (p/s)·θ_i mod 2π in [0, 2π) as fp32, from int64 positions: ``(n,) -> (n, r/2)``,
    ``(b, n) -> (b, 1, n, r/2)`` (the 1 broadcasts over heads).

    ``inv_freq``: θ ``(r/2,)``, taken as exact, or ``(2, r/2)`` = (θ_hi, θ_lo) from
    ``rotary_frequencies(..., extended=True)``. The angle is exact for that θ and every int64
    position, then rounded once to fp32 (see ``rotary_phase``); with a plain fp64 θ the
    rounding of θ itself, up to |p|·θ_i·2^-53 rad, is the only gap to the real base^(−2i/r).
    (MPS: fp32 products, exact only for small |p|.)
    """
    check_tensor(positions, "positions")
    check_tensor(inv_freq, "inv_freq")
    if positions.dtype != torch.int64:
        raise TypeError(f"positions: expected int64 positions, got dtype {positions.dtype}")
    if inv_freq.ndim not in (1, 2) or (inv_freq.ndim == 2 and inv_freq.shape[0] != 2):
        raise ValueError(
            f"inv_freq: expected (r/2,) frequencies or (2, r/2) = (hi, lo), got shape "
            f"{tuple(inv_freq.shape)}"
        )
    s = float(interpolation_factor)
    if not s > 0.0:
        raise ValueError(
            f"interpolation_factor: expected a number > 0, got {interpolation_factor!r}"
        )
    if _wide(positions.device) == torch.float32:  # MPS: no fp64
        theta = (inv_freq if inv_freq.ndim == 1 else inv_freq[0]).to(positions.device)
        angles = (positions.to(torch.float32) / s)[..., None] * theta.float()
    else:
        hi, lo = (inv_freq, None) if inv_freq.ndim == 1 else (inv_freq[0], inv_freq[1])
        angles = phase_angles(positions, phase_table(hi, lo, s))
    return angles[:, None] if positions.ndim == 2 else angles


_PHASE_TABLES: dict[tuple[int, float, float, torch.device], Tensor] = {}


def _phase_table_for(dim: int, base: float, interpolation_factor: float, device: torch.device
                     ) -> Tensor:
    """``phase_table`` of the real θ_i = base^(−2i/dim) and s, fp64 ``(3, dim)`` on ``device``;
    cached per (dim, base, s, device) outside torch.compile (internal: never handed out)."""
    key = (dim, base, interpolation_factor, device)
    table = None if torch.compiler.is_compiling() else _PHASE_TABLES.get(key)
    if table is None:
        hi, lo = rotary_frequencies(dim, base=base, device=device, extended=True)
        table = phase_table(hi, lo, interpolation_factor)
        if not torch.compiler.is_compiling():
            _PHASE_TABLES[key] = table
    return table


def exact_rotary_angles(
    positions: Tensor, dim: int, base: float, interpolation_factor: float
) -> Tensor:
    """``rotary_angles`` of the real θ_i = base^(−2i/dim): exact for every int64 position,
    rounded once to fp32; ``(n,) -> (n, dim/2)``, ``(b, n) -> (b, 1, n, dim/2)``."""
    if _wide(positions.device) == torch.float32:  # MPS: no fp64
        inv_freq = rotary_frequencies(dim, base=base, device=positions.device)
        return rotary_angles(positions, inv_freq, interpolation_factor=interpolation_factor)
    table = _phase_table_for(dim, base, interpolation_factor, positions.device)
    angles = phase_angles(positions, table)
    return angles[:, None] if positions.ndim == 2 else angles


_FREQUENCY_TABLES: dict[tuple, Tensor] = {}


def exact_angles_for_frequencies(
    positions: Tensor, frequencies: tuple[tuple[float, ...], tuple[float, ...]],
    interpolation_factor: float = 1.0,
) -> Tensor:
    """``exact_rotary_angles`` for any per-dimension frequencies given as the double-double
    (θ_hi, θ_lo) Python tuples (``functional.rope_scaling``): exact for every int64 position,
    rounded once to fp32; the phase table is cached per (frequencies, s, device)."""
    hi, lo = frequencies
    if _wide(positions.device) == torch.float32:  # MPS: no fp64
        inv_freq = torch.tensor(hi, dtype=torch.float32, device=positions.device)
        return rotary_angles(positions, inv_freq, interpolation_factor=interpolation_factor)
    key = (hi, lo, interpolation_factor, positions.device)
    table = None if torch.compiler.is_compiling() else _FREQUENCY_TABLES.get(key)
    if table is None:
        t = torch.tensor((hi, lo), dtype=torch.float64, device=positions.device)
        table = phase_table(t[0], t[1], interpolation_factor)
        if not torch.compiler.is_compiling():
            if len(_FREQUENCY_TABLES) > 256:  # dynamic NTK makes one per length: bounded
                _FREQUENCY_TABLES.clear()
            _FREQUENCY_TABLES[key] = table
    angles = phase_angles(positions, table)
    return angles[:, None] if positions.ndim == 2 else angles
