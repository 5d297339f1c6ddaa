"""Moore–Penrose pseudoinverse by the iteration of Razavi et al., as used by Nyströmformer.

    Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)
    Z_{j+1} = ¼ Z_j (13I − A Z_j (15I − A Z_j (7I − A Z_j)))

Razavi et al. 2014, "A new iterative method for finding approximate inverses of complex
matrices"; used by Xiong et al. 2021, "Nyströmformer", arXiv 2102.03902, eq. (16).

With E_j = I − A Z_j the residual obeys E_{j+1} = (3E_j³ + E_j⁴)/4, so the iteration converges
(locally with order 3) to A⁺ once ‖E₀‖ < 1, which the init guarantees. Z_j is always
Aᵀ·g(AAᵀ) for a polynomial g, so it never leaves A's row space: rows or columns of A that are
zero (masked landmarks) stay zero columns or rows of Z, and Z converges to the pseudoinverse
of the live block.

Shapes: a ``(..., m, m)`` (any leading batch dims, e.g. ``(b, h, m, m)``) -> ``(..., m, m)``.
The init is taken **per matrix**: the norms are reduced over the last two dims only, so one
batch element never changes another's result (the reference code and nystrom-attention take
one max over the whole batch × heads tensor). Approximate after finitely many steps; a
truncated iteration acts as a regulariser, so more steps are not always more accurate for the
attention output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo._checks import check_floating, check_tensor


def check_pinv_iterations(value: object, *, allow_none: bool = True) -> int | None:
    """An int >= 0 (or None, meaning the exact pinv, where allowed); ValueError otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        expected = "an int >= 0 or None (exact pinv)" if allow_none else "an int >= 0"
        raise ValueError(f"pinv_iterations: expected {expected}, got {value!r}")
    return value


def pinv_init(a: Tensor) -> Tensor:
    """Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞) for every matrix in the batch; a zero matrix gives Z₀ = 0."""
    abs_a = a.abs()
    norm_1 = abs_a.sum(dim=-2).amax(dim=-1)  # (...,) max column sum
    norm_inf = abs_a.sum(dim=-1).amax(dim=-1)  # (...,) max row sum (1 for a softmax)
    denom = (norm_1 * norm_inf).clamp_min(torch.finfo(a.dtype).tiny)
    return a.transpose(-2, -1) / denom[..., None, None]


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """``iterations`` steps of the cubic Moore–Penrose iteration from the per-matrix init.

    Args:
        a: ``(..., m, m)`` floating tensor.
        iterations: number of steps (0 returns the init itself).

    Returns:
        ``(..., m, m)`` approximation of ``a⁺``. Differentiable (autograd runs through the
        steps, so the gradient is that of the truncated iteration, not of the exact pinv).
    """
    check_tensor(a, "a")
    check_floating(a, "a")
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a: expected square matrices (..., m, m), got {tuple(a.shape)}")
    check_pinv_iterations(iterations, allow_none=False)
    m = a.shape[-1]
    flat = a.reshape(-1, m, m)  # (B, m, m): baddbmm fuses "cI − X" into each product
    z = pinv_init(flat)
    for _ in range(iterations):
        az = torch.bmm(flat, z)  # A Z
        inner = torch.baddbmm(az, az, az, beta=7, alpha=-1)  # AZ (7I − AZ)
        inner = torch.baddbmm(az, az, inner, beta=15, alpha=-1)  # AZ (15I − ·)
        z = torch.baddbmm(z, z, inner, beta=3.25, alpha=-0.25)  # ¼ Z (13I − ·)
    return z.reshape(a.shape)
