"""Rotary position embedding (RoPE) kernels.

    R_p x:  (x_a, x_b) ← (x_a cos pθ_i − x_b sin pθ_i,  x_b cos pθ_i + x_a sin pθ_i)
    θ_i = base^(−2i/r),  i = 0 … r/2 − 1,   so that   (R_m q)ᵀ (R_n k) = qᵀ R_(n−m) k

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv 2104.09864, eq. 13-15 (and eq. 19 for linear attention: rotate only the numerator's
features).

Two layouts pair the channels differently; they are the same map up to a fixed permutation of
channels (``permute_rotary_weight`` moves q/k projection weights from one to the other):

- ``RotaryLayout.INTERLEAVED``: pairs (2i, 2i+1) — RoFormer, GPT-J, torchtune,
  rotary-embedding-torch.
- ``RotaryLayout.HALF_SPLIT``: pairs (i, i + r/2) — GPT-NeoX, HF Llama/Qwen.

Only the first r = ``dim`` channels rotate (partial rotary); the rest pass through.
Extensions: linear position interpolation (Chen et al. 2023, arXiv 2306.15595) divides
positions by s; NTK-aware scaling (bloc97, 2023) replaces base by base·s^(r/(r−2)).

Precision: angles p·θ_i/s mod 2π are computed exactly from the int64 positions (split into
three 21-bit chunks against a per-frequency table of turns, ``rotary_phase``) to within ~1e-12
rad, for every |p| < 2^63, and only then rounded to fp32, so each fp32 angle is the correctly
rounded exact angle (error ≤ half an fp32 ulp: ≤ 2.4e-7 rad in [0, 2π)). θ_i = base^(−2i/r) is
the real number (carried as a double-double from 60-digit ``decimal``; base is the float given,
after NTK the fp64 number ``ntk_scaled_base`` returns), and p/s is exact. fp32 angles (HF,
torchtune) are off by up to |p θ_i|·2^-24, 0.006 rad at p = 10^5; a plain fp64 product p·θ_i
mod 2π (this library before) by 5e-6 rad at 2^36 and 0.7 rad at 2^53. cos/sin are cast to the
input dtype only when applied. MPS has no fp64 and stays in fp32 (p·θ_i in fp32, exact only
for small p). Positions are never rounded to the input dtype (rotary-embedding-torch builds
them in it: in bf16 positions above 256 collide).

Shapes: b batch, h heads, n length, w channels (head_dim, or features), r rotated channels.
x ``(b, h, n, w)``, positions int64 ``(n,)`` or ``(b, n)``.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from transformer_zoo._checks import (
    check_floating,
    check_positions,
    check_positive_int,
    check_rank,
    check_tensor,
)
from transformer_zoo.functional.rotary_phase import (
    frequencies_double_double,
    phase_angles,
    phase_table,
)


class RotaryLayout(enum.Enum):
    """How the rotated channels are paired."""

    INTERLEAVED = "interleaved"  # pairs (2i, 2i+1): RoFormer, GPT-J, torchtune
    HALF_SPLIT = "half_split"  # pairs (i, i + r/2): GPT-NeoX, Llama


def _check_layout(layout: object) -> RotaryLayout:
    if not isinstance(layout, RotaryLayout):
        raise TypeError(
            f"layout: expected a RotaryLayout (RotaryLayout.INTERLEAVED or "
            f"RotaryLayout.HALF_SPLIT), got {layout!r}"
        )
    return layout


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


def rotary_reference(x: Tensor, angles: Tensor, *, layout: RotaryLayout) -> Tensor:
    """The rotation written out in the input dtype (cos/sin cast to it): the readable
    definition, and the path used under ``torch.compile`` (where it fuses into one kernel).
    """
    half = angles.shape[-1]
    r = 2 * half
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (.., n, r/2)
    if layout is RotaryLayout.HALF_SPLIT:
        x1, x2 = x[..., :half], x[..., half:r]  # (b, h, n, r/2) each
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        pairs = x[..., :r].reshape(*x.shape[:-1], half, 2)  # (b, h, n, r/2, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


def _rotate_half_split_into(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation written straight into one output buffer (no temporaries)."""
    half = cos.shape[-1]
    out = torch.empty_like(x)
    x1, x2 = x[..., :half], x[..., half : 2 * half]  # (b, h, n, r/2) each
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    if 2 * half < x.shape[-1]:
        out[..., 2 * half :] = x[..., 2 * half :]
    return out


class _HalfSplitRotation(torch.autograd.Function):
    """R_θ x in the half-split layout; the gradient is R_θᵀ g = R_(−θ) g (R is orthogonal)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate_half_split_into(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors  # calling apply again keeps it twice differentiable
        return _HalfSplitRotation.apply(grad, cos, -sin), None, None


def rotary_tables(angles: Tensor, dtype: torch.dtype, layout: RotaryLayout) -> tuple[Tensor, ...]:
    """What ``apply_rotary_tables`` multiplies by, computed once per set of angles: (cos, sin)
    in ``dtype`` for half-split, the rotor e^(iθ) (complex, fp32 or fp64) for interleaved."""
    if layout is RotaryLayout.HALF_SPLIT:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    angles = angles.to(torch.promote_types(dtype, torch.float32))  # fp32, or fp64 for fp64
    return (torch.polar(torch.ones_like(angles), angles),)  # e^(iθ), (.., n, r/2)


def apply_rotary_tables(x: Tensor, tables: tuple[Tensor, ...], *, layout: RotaryLayout) -> Tensor:
    """Rotate the first r channels of x ``(b, h, n, w)`` with ``rotary_tables`` output."""
    if layout is RotaryLayout.HALF_SPLIT:
        cos, sin = tables
        return _HalfSplitRotation.apply(x, cos.to(x.dtype), sin.to(x.dtype))
    (rotor,) = tables
    half = rotor.shape[-1]
    r = 2 * half
    work = torch.promote_types(x.dtype, torch.float32)
    pairs = x[..., :r].to(work).reshape(*x.shape[:-1], half, 2)  # (b, h, n, r/2, 2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(
        s % 2 for s in pairs.stride()[:-1]
    ):
        pairs = pairs.contiguous()
    product = torch.view_as_complex(pairs) * rotor.to(torch.complex128 if work == torch.float64
                                                      else torch.complex64)
    rotated = torch.view_as_real(product).flatten(-2).to(x.dtype)
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


def apply_rotary_angles(x: Tensor, angles: Tensor, *, layout: RotaryLayout) -> Tensor:
    """Rotate the first r = 2·angles.shape[-1] channels of ``x`` by ``angles`` (fp32).

    x ``(b, h, n, w)``; angles broadcastable to ``(b, h, n, r/2)``. Same result as
    ``rotary_reference`` (up to rounding), faster in eager mode:

    - interleaved: one complex multiply x·e^(iθ) in fp32 (x upcast if needed; fp64 stays
      fp64), cast back;
    - half-split: cos/sin cast to x's dtype, written into one buffer, custom backward.
    """
    if torch.compiler.is_compiling():
        return rotary_reference(x, angles, layout=layout)
    return apply_rotary_tables(x, rotary_tables(angles, x.dtype, layout), layout=layout)


def check_rotary_input(x: Tensor, positions: Tensor, dim: int) -> None:
    """Validate x ``(b, h, n, w)``, positions int64 ``(n,)``/``(b, n)`` and ``dim <= w``."""
    check_rank(x, "x", 4, "(batch, heads, seq, channels)")
    check_floating(x, "x")
    b, _, n, w = x.shape
    check_positions(positions, b, n)  # (a set-membership test would specialise under compile)
    if dim > w:
        raise ValueError(f"dim: expected at most the {w} channels of x, got {dim}")


def apply_rotary(
    x: Tensor,
    positions: Tensor,
    *,
    dim: int,
    base: float = 10000.0,
    layout: RotaryLayout = RotaryLayout.INTERLEAVED,
    interpolation_factor: float = 1.0,
    ntk_factor: float = 1.0,
) -> Tensor:
    """Rotate the first ``dim`` channels of x ``(b, h, n, w)`` by int64 ``positions``.

    θ_i = base'^(−2i/dim) with base' = ``ntk_scaled_base(base, dim, ntk_factor)``; positions
    are divided by ``interpolation_factor``. Returns a tensor of x's shape and dtype.
    """
    _check_even_dim(dim)
    _check_layout(layout)
    check_rotary_input(x, positions, dim)
    interpolation_factor = _check_factor(interpolation_factor, "interpolation_factor")
    if not float(base) > 1.0:
        raise ValueError(f"base: expected a number > 1, got {base!r}")
    scaled = ntk_scaled_base(float(base), dim, ntk_factor)
    angles = exact_rotary_angles(positions, dim, scaled, interpolation_factor)
    return apply_rotary_angles(x, angles, layout=layout)


def rotary_permutation(
    dim: int, *, source: RotaryLayout, target: RotaryLayout
) -> Tensor:
    """Index ``perm`` ``(dim,)`` with ``y_target = y_source[perm]`` for one head's channels."""
    _check_even_dim(dim)
    _check_layout(source)
    _check_layout(target)
    idx = torch.arange(dim)
    if source is target:
        return idx
    to_half = torch.cat((idx[0::2], idx[1::2]))  # half-split i <- 2i, i + r/2 <- 2i + 1
    if target is RotaryLayout.HALF_SPLIT:
        return to_half
    return torch.argsort(to_half)


def permute_rotary_weight(
    weight: Tensor,
    *,
    n_heads: int,
    head_dim: int,
    source: RotaryLayout,
    target: RotaryLayout,
    rotary_dim: int | None = None,
) -> Tensor:
    """Reorder the rows of a q or k projection weight ``(n_heads·head_dim, in)`` (or bias
    ``(n_heads·head_dim,)``) so that RoPE in ``target`` layout on the new projection equals
    RoPE in ``source`` layout on the old one, up to the same channel permutation of q and k
    (so every qᵀk, hence attention, is unchanged). Channels past ``rotary_dim`` stay put.
    """
    check_tensor(weight, "weight")
    check_positive_int(n_heads, "n_heads")
    check_positive_int(head_dim, "head_dim")
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    _check_even_dim(rotary_dim, "rotary_dim")
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim: expected at most head_dim={head_dim}, got {rotary_dim}")
    if weight.ndim not in (1, 2) or weight.shape[0] != n_heads * head_dim:
        raise ValueError(
            f"weight: expected (n_heads·head_dim, ...) = ({n_heads * head_dim}, ...) rows, "
            f"got shape {tuple(weight.shape)}"
        )
    per_head = torch.cat(
        (
            rotary_permutation(rotary_dim, source=source, target=target),
            torch.arange(rotary_dim, head_dim),
        )
    )
    offsets = torch.arange(n_heads)[:, None] * head_dim
    perm = (offsets + per_head).flatten().to(weight.device)
    return weight[perm]
