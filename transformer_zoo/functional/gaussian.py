"""Divergences between multivariate Gaussians p = N(μp, Σp), q = N(μq, Σq) in closed form.

    KL(p‖q)  = ½ [ Δμᵀ Σq⁻¹ Δμ + tr(Σq⁻¹ Σp) − n + log det Σq − log det Σp ]
    B(p, q)  = ⅛ Δμᵀ Σ⁻¹ Δμ + ½ log[ det Σ / √(det Σp · det Σq) ],    Σ = (Σp + Σq)/2
    W₂²(p, q) = ‖Δμ‖² + tr Σp + tr Σq − 2 tr[(Σp^½ Σq Σp^½)^½]

with Δμ = μq − μp and n the dimension. Kullback and Leibler 1951; Bhattacharyya 1943;
the W₂ formula is Dowson and Landau 1982 / Givens and Shortt 1984 (the Fréchet distance
behind FID, Heusel et al. 2017, arXiv 1706.08500). Collected in the seed post on KL,
Bhattacharyya and Wasserstein distances between Gaussians.

How it is computed (all differentiable, batched, no explicit inverse):
- Cholesky factors Σ = L Lᵀ give log det Σ = 2 Σ log diag L; Mahalanobis terms and
  tr(Σq⁻¹ Σp) = ‖Lq⁻¹ Lp‖_F² come from triangular solves.
- The W₂ cross term uses the symmetric eigenvalues of C = Lpᵀ Σq Lp. Since Lp = Σp^½ R with R
  orthogonal, C = Rᵀ (Σp^½ Σq Σp^½) R has exactly the spectrum of Σp^½ Σq Σp^½, so
  tr[(Σp^½ Σq Σp^½)^½] = Σ √λ_i(C) without forming a matrix square root. Only eigenvalues are
  differentiated (``eigvalsh``, whose backward U diag(ḡ) Uᵀ has no divided differences), so
  repeated eigenvalues (e.g. Σ = I) give finite gradients.
- Singular Σq: eigenvalues λ_i ≤ n·eps·λ_max (numpy's ``matrix_rank`` tolerance) count as
  exactly 0, with √0 = 0 and derivative 0 there (the gradient of tr C^½ is ½ C^(+½), the
  pseudo-inverse root). That is the exact limit ε → 0 of the gradient at Σq + εI for Σp, the
  means, and any Σq = A Aᵀ (a sample covariance, a low-rank factor), and for the Σq-gradient's
  blocks that touch range(Σq). Only the block on null(Σq) × null(Σq) has no finite limit
  (W₂² falls like −2√t as a zero eigenvalue grows by t); it gets the finite part, I.
- Each result is clamped at 0 (all three are ≥ 0; rounding can give −1e−16 for p = q).

Exact up to float rounding; use fp64 for ill-conditioned covariances. Which covariances may be
singular: KL and Bhattacharyya need both positive definite — with a singular one they are +∞
(one Gaussian lives on a subspace the other gives measure 0); W₂ is finite for any PSD pair but
factors Σp, so Σp must be positive definite and Σq may be singular (W₂ is symmetric: pass a
singular covariance as ``cov_q``). A failed Cholesky raises a ValueError naming the covariance.

Shapes: μ ``(..., n)``, Σ ``(..., n, n)``; the batch dims ``...`` of the four inputs
broadcast; the result has the broadcast batch shape ``(...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo._checks import check_floating, check_same_dtype, check_tensor


def _check_gaussians(mu_p: Tensor, cov_p: Tensor, mu_q: Tensor, cov_q: Tensor) -> None:
    names = ("mu_p", "cov_p", "mu_q", "cov_q")
    for name, t in zip(names, (mu_p, cov_p, mu_q, cov_q), strict=True):
        check_tensor(t, name)
        check_floating(t, name)
        check_same_dtype("mu_p", mu_p, name, t)
    if mu_p.ndim < 1:
        raise ValueError(f"mu_p: expected a mean of shape (..., n), got {tuple(mu_p.shape)}")
    n = mu_p.shape[-1]
    for name, mu, cov in (("p", mu_p, cov_p), ("q", mu_q, cov_q)):
        if mu.ndim < 1 or mu.shape[-1] != n:
            raise ValueError(f"mu_{name}: expected shape (..., {n}), got {tuple(mu.shape)}")
        if cov.ndim < 2 or tuple(cov.shape[-2:]) != (n, n):
            raise ValueError(
                f"cov_{name}: expected shape (..., {n}, {n}) to match mu_{name}, "
                f"got {tuple(cov.shape)}"
            )
    try:
        torch.broadcast_shapes(mu_p.shape[:-1], cov_p.shape[:-2], mu_q.shape[:-1], cov_q.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            "batch dims of mu_p, cov_p, mu_q, cov_q do not broadcast: "
            f"{tuple(mu_p.shape)}, {tuple(cov_p.shape)}, {tuple(mu_q.shape)}, {tuple(cov_q.shape)}"
        ) from err


def _cholesky(cov: Tensor, name: str, why: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(cov)
    # A data-dependent check: skipped under torch.compile (it would break the graph); there a
    # non-positive-definite covariance gives NaN instead of this error.
    if not torch.compiler.is_compiling() and bool((info != 0).any()):
        raise ValueError(f"{name}: expected symmetric positive definite covariances ({why})")
    return factor  # (..., n, n) lower triangular


def _trace_sqrt_psd(c: Tensor) -> Tensor:
    """tr C^½ = Σ √λ_i for symmetric PSD C ``(..., n, n) -> (...)``, with a finite gradient
    ½ C^(+½) when C is singular: eigenvalues ≤ n·eps·λ_max are taken as exact zeros, whose
    square root is 0 with derivative 0 (the double ``where`` keeps NaN out of the backward)."""
    evals = torch.linalg.eigvalsh(c)  # ascending
    tol = c.shape[-1] * torch.finfo(c.dtype).eps * evals[..., -1:].clamp_min(0.0)
    kept = evals > tol
    roots = torch.where(kept, evals, torch.ones_like(evals)).sqrt()
    return torch.where(kept, roots, torch.zeros_like(roots)).sum(-1)


def _logdet(factor: Tensor) -> Tensor:
    return 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (...)


def _mahalanobis_sq(factor: Tensor, diff: Tensor) -> Tensor:
    """‖L⁻¹ Δ‖² = Δᵀ Σ⁻¹ Δ for Σ = L Lᵀ; factor ``(..., n, n)``, diff ``(..., n)``."""
    z = torch.linalg.solve_triangular(factor, diff.unsqueeze(-1), upper=False)  # (..., n, 1)
    return z.squeeze(-1).square().sum(-1)


def gaussian_kl(mu_p: Tensor, cov_p: Tensor, mu_q: Tensor, cov_q: Tensor) -> Tensor:
    """KL(p‖q) for p = N(mu_p, cov_p), q = N(mu_q, cov_q); not symmetric. ``-> (...)``."""
    _check_gaussians(mu_p, cov_p, mu_q, cov_q)
    why = "KL(p‖q) is +∞ when either covariance is singular"
    l_p, l_q = _cholesky(cov_p, "cov_p", why), _cholesky(cov_q, "cov_q", why)
    l_p, l_q = torch.broadcast_tensors(l_p, l_q)
    trace = torch.linalg.solve_triangular(l_q, l_p, upper=False).square().sum((-2, -1))
    maha = _mahalanobis_sq(l_q, mu_q - mu_p)
    kl = 0.5 * (maha + trace - mu_p.shape[-1] + _logdet(l_q) - _logdet(l_p))
    return kl.clamp_min(0.0)


def gaussian_bhattacharyya(mu_p: Tensor, cov_p: Tensor, mu_q: Tensor, cov_q: Tensor) -> Tensor:
    """Bhattacharyya distance −log ∫ √(p q) between two Gaussians; symmetric. ``-> (...)``."""
    _check_gaussians(mu_p, cov_p, mu_q, cov_q)
    why = "the Bhattacharyya distance is +∞ when either covariance is singular"
    l_mid = _cholesky(0.5 * (cov_p + cov_q), "(cov_p + cov_q) / 2", why)
    logdet_p = _logdet(_cholesky(cov_p, "cov_p", why))
    logdet_q = _logdet(_cholesky(cov_q, "cov_q", why))
    maha = _mahalanobis_sq(l_mid, mu_q - mu_p)
    dist = maha / 8.0 + 0.5 * (_logdet(l_mid) - 0.5 * (logdet_p + logdet_q))
    return dist.clamp_min(0.0)


def gaussian_wasserstein2(
    mu_p: Tensor, cov_p: Tensor, mu_q: Tensor, cov_q: Tensor, *, squared: bool = True
) -> Tensor:
    """2-Wasserstein distance between two Gaussians; symmetric. ``-> (...)``.

    Returns W₂² (default) or W₂ with ``squared=False`` (whose gradient is infinite at p = q).
    ``cov_q`` may be singular (PSD); ``cov_p`` must be positive definite.
    """
    _check_gaussians(mu_p, cov_p, mu_q, cov_q)
    l_p = _cholesky(cov_p, "cov_p", "W₂ is symmetric: pass a singular covariance as cov_q")
    c = l_p.mT @ cov_q @ l_p  # (..., n, n), same spectrum as Σp^½ Σq Σp^½
    c = 0.5 * (c + c.mT)
    cross = _trace_sqrt_psd(c)  # tr[(Σp^½ Σq Σp^½)^½]
    trace_p = cov_p.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace_q = cov_q.diagonal(dim1=-2, dim2=-1).sum(-1)
    w2_sq = ((mu_p - mu_q).square().sum(-1) + trace_p + trace_q - 2.0 * cross).clamp_min(0.0)
    return w2_sq if squared else w2_sq.sqrt()
