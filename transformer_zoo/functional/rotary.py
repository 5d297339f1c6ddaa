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

Precision: angles are formed from int64 positions in fp64 and reduced mod 2π, then rounded to
fp32 (cos/sin are cast to the input dtype only when applied), so every angle is within ~4e-7
rad of the exact p·θ_i at any position — fp32 angles (HF, torchtune) are off by up to
|p θ_i|·2^-24, 0.006 rad at p = 10^5. MPS has no fp64 and stays in fp32. Positions are never
rounded to the input dtype (rotary-embedding-torch builds them in it: in bf16 positions above
256 collide).

Shapes: b batch, h heads, n length, w channels (head_dim, or features), r rotated channels.
x ``(b, h, n, w)``, positions int64 ``(n,)`` or ``(b, n)``.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

from transformer_zoo._checks import (
    check_floating,
    check_positions,
    check_positive_int,
    check_rank,
    check_tensor,
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
    dim: int, *, base: float = 10000.0, device: torch.device | str | None = None
) -> Tensor:
    """θ_i = base^(−2i/dim), i = 0 … dim/2 − 1, ``(dim/2,)`` in fp64 (fp32 on MPS)."""
    _check_even_dim(dim)
    if not float(base) > 1.0:
        raise ValueError(f"base: expected a number > 1, got {base!r}")
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # on CPU: MPS has no fp64
    return (float(base) ** -exponent).to(device=device, dtype=_wide(device))


def rotary_angles(
    positions: Tensor, inv_freq: Tensor, *, interpolation_factor: float = 1.0
) -> Tensor:
    """Angles p·θ_i mod 2π as fp32, from int64 positions: ``(n,) -> (n, r/2)``,
    ``(b, n) -> (b, 1, n, r/2)`` (the 1 broadcasts over heads). Formed in fp64 (fp32 on MPS)."""
    wide = _wide(positions.device)
    p = positions.to(wide)  # exact for |p| < 2^53
    if interpolation_factor != 1.0:
        p = p / interpolation_factor
    angles = p[..., None] * inv_freq.to(device=positions.device, dtype=wide)
    if wide == torch.float64:
        angles = torch.remainder(angles, 2 * math.pi)  # keeps fp32 rounding at ~4e-7 rad
    angles = angles.to(torch.float32)
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
        pairs = x[..., :r].unflatten(-1, (half, 2))  # (b, h, n, r/2, 2)
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
    pairs = x[..., :r].to(work).unflatten(-1, (half, 2))  # (b, h, n, r/2, 2)
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
    inv_freq = rotary_frequencies(
        dim, base=ntk_scaled_base(base, dim, ntk_factor), device=positions.device
    )
    angles = rotary_angles(positions, inv_freq, interpolation_factor=interpolation_factor)
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
