"""Rotary position embedding (RoPE) kernels: the rotation.

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
θ_i, the NTK-aware base, position interpolation and the angles p·θ_i/s mod 2π (exact for every
int64 position, rounded once to fp32) are built in ``rotary_theta`` and re-exported here.
cos/sin are cast to the input dtype only when applied.

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
from transformer_zoo.functional.rotary_theta import (
    _check_even_dim,
    _check_factor,
    exact_rotary_angles,
    ntk_scaled_base,
    rotary_angles,  # noqa: F401  (re-exported: part of this module's API)
    rotary_frequencies,  # noqa: F401  (re-exported)
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


def _scaled(t: Tensor, scale: float | Tensor) -> Tensor:
    return t if isinstance(scale, (int, float)) and scale == 1.0 else t * scale


def rotary_reference(
    x: Tensor, angles: Tensor, *, layout: RotaryLayout, scale: float | Tensor = 1.0
) -> Tensor:
    """The rotation written out in the input dtype (cos/sin cast to it): the readable
    definition, and the path used under ``torch.compile`` (where it fuses into one kernel).
    ``scale`` (a number, or fp32 broadcastable to angles) multiplies cos and sin of the rotated
    channels only, as HF applies an attention factor and rotary-embedding-torch xPos scales.
    """
    half = angles.shape[-1]
    r = 2 * half
    cos = _scaled(angles.cos(), scale).to(x.dtype)  # (.., n, r/2)
    sin = _scaled(angles.sin(), scale).to(x.dtype)
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


def rotary_tables(
    angles: Tensor, dtype: torch.dtype, layout: RotaryLayout, scale: float | Tensor = 1.0
) -> tuple[Tensor, ...]:
    """What ``apply_rotary_tables`` multiplies by, computed once per set of angles: (cos, sin)
    in ``dtype`` for half-split, the rotor e^(iθ) (complex, fp32 or fp64) for interleaved;
    both times ``scale`` (see ``rotary_reference``; the rotation stays R·scale, whose
    transpose the half-split backward applies)."""
    if layout is RotaryLayout.HALF_SPLIT:
        return _scaled(angles.cos(), scale).to(dtype), _scaled(angles.sin(), scale).to(dtype)
    angles = angles.to(torch.promote_types(dtype, torch.float32))  # fp32, or fp64 for fp64
    modulus = _scaled(torch.ones_like(angles), scale).to(angles.dtype)
    return (torch.polar(*torch.broadcast_tensors(modulus, angles)),)  # scale·e^(iθ), (.., n, r/2)


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


def apply_rotary_angles(
    x: Tensor, angles: Tensor, *, layout: RotaryLayout, scale: float | Tensor = 1.0
) -> Tensor:
    """Rotate the first r = 2·angles.shape[-1] channels of ``x`` by ``angles`` (fp32), times
    ``scale`` on those channels (default 1: a pure rotation).

    x ``(b, h, n, w)``; angles broadcastable to ``(b, h, n, r/2)``. Same result as
    ``rotary_reference`` (up to rounding), faster in eager mode:

    - interleaved: one complex multiply x·e^(iθ) in fp32 (x upcast if needed; fp64 stays
      fp64), cast back;
    - half-split: cos/sin cast to x's dtype, written into one buffer, custom backward.
    """
    if torch.compiler.is_compiling():
        return rotary_reference(x, angles, layout=layout, scale=scale)
    return apply_rotary_tables(x, rotary_tables(angles, x.dtype, layout, scale), layout=layout)


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
