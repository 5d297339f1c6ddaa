"""Pseudoinverses for Nyström attention: the iteration of Razavi et al. and a regularised one.

    Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)
    Z_{j+1} = ¼ Z_j (13I − A Z_j (15I − A Z_j (7I − A Z_j)))       iterative_pinv
    Z_λ = (AᵀA + λ²I)⁻¹ Aᵀ,  λ = ridge · σ₁(A)                        regularized_pinv

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

``regularized_pinv`` makes that regularisation explicit. In the SVD A = U Σ Vᵀ every
pseudoinverse here is V φ(Σ) Uᵀ with a filter φ: the exact one has φ(σ) = 1/σ, which blows up
the smallest singular values; Tikhonov (ridge) regularisation has φ(σ) = σ / (σ² + λ²), ≈ 1/σ
for σ ≫ λ and ≈ σ/λ² → 0 below λ (the truncated iteration's filter σ·g(σ²) also → 0 as σ → 0);
a relative cut-off has φ(σ) = 1/σ above rtol · σ₁ and 0 below. Tikhonov regularisation:
Tikhonov & Arsenin 1977, "Solutions of Ill-Posed Problems"; Hansen 1998, "Rank-Deficient and
Discrete Ill-Posed Problems", ch. 4–5 (filter factors).
"""

from __future__ import annotations

import math

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


def check_pinv_ridge(value: object, *, allow_none: bool = True) -> float | None:
    """A finite float >= 0 (or None where allowed); TypeError / ValueError otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"pinv_ridge: expected a float >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"pinv_ridge: expected a finite float >= 0, got {value!r}")
    return float(value)


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


def regularized_pinv(a: Tensor, *, ridge: float = 0.0, rtol: float = 0.0) -> Tensor:
    """Tikhonov-regularised (``ridge``) or truncated (``rtol``) pseudoinverse, per matrix.

    Args:
        a: ``(..., m, m)`` floating tensor.
        ridge: λ / σ₁(A) >= 0. ``Z = (AᵀA + λ²I)⁻¹ Aᵀ``, the minimiser of ‖AZ − I‖²_F + λ²‖Z‖²_F:
            singular values below λ are damped instead of inverted. Solved by a Cholesky
            factorisation of AᵀA + λ²I, whose condition number is <= 1 + 1/ridge² (101 at
            ridge 0.1); the gradient is exact. A ridge below √(4·m·eps) of the dtype (5.5e-3
            for m = 64 in fp32, 3e-7 in fp64) is raised to it, the least that keeps the
            rounded AᵀA + λ²I positive definite. A zero matrix gives 0.
        rtol: with ``ridge=0``, singular values <= rtol · σ₁ are dropped
            (``torch.linalg.pinv(a, rtol=...)``); rtol = 0 keeps all but the numerically zero
            ones (torch's default cut-off, m · eps · σ₁), so ``ridge=0, rtol=0`` is the exact
            pseudoinverse. Its gradient is torch's, which assumes the kept rank is constant.

    Returns:
        ``(..., m, m)``. Zero rows or columns of A (masked landmarks) give zero columns or rows.
    """
    check_tensor(a, "a")
    check_floating(a, "a")
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a: expected square matrices (..., m, m), got {tuple(a.shape)}")
    ridge = check_pinv_ridge(ridge, allow_none=False)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        raise ValueError(f"rtol: expected a float in [0, 1), got {rtol!r}")
    if ridge > 0 and rtol > 0:
        raise ValueError(f"regularized_pinv: give ridge or rtol, not both (got ridge={ridge}, "
                         f"rtol={rtol})")
    m = a.shape[-1]
    if ridge == 0:
        floor = m * torch.finfo(a.dtype).eps
        return torch.linalg.pinv(a, rtol=max(float(rtol), floor))
    ridge = max(ridge, math.sqrt(4 * m * torch.finfo(a.dtype).eps))
    sigma_1 = torch.linalg.matrix_norm(a, ord=2)  # (...,) largest singular value
    lam2 = (ridge * sigma_1).square().clamp_min(torch.finfo(a.dtype).tiny)  # (...,)
    at = a.transpose(-2, -1)
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    gram = at @ a + lam2[..., None, None] * eye  # (..., m, m) symmetric positive definite
    # Cholesky, not LU: gram is SPD, and batched LU solves fail in MKL with several threads
    # (torch 2.13 CPU, m >= 256: "Pivots given to lu_solve must all be greater or equal to 1")
    return torch.cholesky_solve(at.contiguous(), torch.linalg.cholesky(gram))
