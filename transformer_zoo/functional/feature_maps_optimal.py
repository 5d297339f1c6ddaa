"""Optimal positive random features (OPRF, "FAVOR++"): FAVOR+ with a variance-minimising A.

    φ(x̂) = D exp(A|ω|² + B ωᵀx̂ − |x̂|²/2),   ω ~ N(0, I_d),   B = √(1 − 4A),   D = (1 − 4A)^(d/4)
    E_ω[φ(x̂) φ(ŷ)] = exp(x̂ᵀŷ)   for every A < 1/4          (positive and unbiased)
    A* = (1 − 2ρ − √((2ρ + 1)² + 8ρ)) / 16,   ρ = mean_{i,j} |q̂_i + k̂_j|² / d    (A* ≤ 0)

Likhosherstov, Choromanski, Dubey, Liu, Sarlos, Weller 2022, "Chefs' Random Tables:
Non-Trigonometric Random Features" (NeurIPS 2022, arXiv 2205.15317). A = 0 is FAVOR+'s
``PositiveFeatures``. Why A*: the second moment of one feature product is

    E[φ(x̂)² φ(ŷ)²] = (1 − 4A)^d (1 − 8A)^(−d/2) exp(2(1 − 4A)|x̂ + ŷ|² / (1 − 8A) − |x̂|² − |ŷ|²)

(finite for A < 1/8); setting its A-derivative to zero with |x̂ + ŷ|² = ρd gives the quadratic
16A² − (2 − 4ρ)A − ρ = 0, whose root below 1/8 is A*. ρ is averaged over all (query, key) pairs,
which is exact in O((n + m)d): mean |q̂_i + k̂_j|² = mean|q̂|² + mean|k̂|² + 2 q̄ᵀk̄.

``antithetic=True`` (default) pairs every ω with −ω, as ``HyperbolicFeatures`` does (F = 2r):
still unbiased, and the odd terms of the estimator cancel. Measured on unit-normal q, k scaled
by 0.5 (d = 64, n = 1024, F = 256): relative error 0.34 against 0.42 for FAVOR+ (docs/performer.md).

Exact vs approximate: an unbiased Monte Carlo estimate of the softmax kernel for any fixed A
(ω marginally Gaussian: ``RowNorms.CHI``). D and, on the query side, exp(−|q̂|²/2) cancel
between numerator and denominator and are omitted exactly. With ``rho=None``, ρ is measured per
(batch, head) over *real* queries and keys (padding masks) and treated as a constant in the
backward pass (stop-gradient: the estimate is unbiased for every A, so A only sets its
variance). That uses every key for every query, so causal attention needs a fixed ``rho``.
Shapes: x̂ ``(b, h, n, d)``, W ``(r, d)`` -> log-features ``(b, h, n, F)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transformer_zoo.functional.feature_maps import FeatureMap


def optimal_a(rho: Tensor | float) -> Tensor | float:
    """A* = (1 − 2ρ − √((2ρ + 1)² + 8ρ)) / 16 for ρ ≥ 0: A*(0) = 0, decreasing in ρ."""
    if isinstance(rho, Tensor):
        return (1 - 2 * rho - torch.sqrt((2 * rho + 1).square() + 8 * rho)) / 16
    return (1 - 2 * rho - math.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


def mean_pair_rho(
    q_hat: Tensor, k_hat: Tensor, query_padding_mask: Tensor | None,
    key_padding_mask: Tensor | None,
) -> Tensor:
    """ρ = mean over real (i, j) of |q̂_i + k̂_j|² / d, per (batch, head): ``(b, h, 1, 1)``."""

    def moments(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if mask is None:
            return x.square().sum(-1).mean(-1), x.mean(-2)  # (b, h), (b, h, d)
        keep = mask[:, None, :, None]  # (b, 1, n, 1)
        x = torch.where(keep, x, 0.0)  # padded rows of any content (even inf) count as 0
        count = keep.sum(-2).to(x.dtype).clamp_min(1)  # (b, 1, 1)
        return x.square().sum(-1).sum(-1) / count.squeeze(-1), x.sum(-2) / count

    x = q_hat.detach()
    y = k_hat.detach()
    qsq, qbar = moments(x, query_padding_mask)
    ksq, kbar = moments(y, key_padding_mask)
    rho = (qsq + ksq + 2 * (qbar * kbar).sum(-1)) / x.shape[-1]  # (b, h)
    return rho.clamp_min(0)[..., None, None]


class OptimalPositiveFeatures(FeatureMap):
    """FAVOR++ features; see the module docstring.

    Args:
        rho: a fixed ρ ≥ 0 (A = A*(ρ); ``rho=0`` is FAVOR+), or None (default) to measure ρ on
            every call from the real queries and keys (bidirectional attention only).
        antithetic: pair ω with −ω (F = 2r features from r rows of W).
    """

    def __init__(self, *, rho: float | None = None, antithetic: bool = True) -> None:
        if rho is not None:
            if isinstance(rho, bool) or not isinstance(rho, (int, float)):
                raise TypeError(f"rho: expected a float >= 0 or None, got {type(rho).__name__}")
            if not math.isfinite(rho) or rho < 0:
                raise ValueError(f"rho: expected a finite float >= 0 or None, got {rho}")
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic: expected a bool, got {type(antithetic).__name__}")
        self.rho, self.antithetic = None if rho is None else float(rho), antithetic
        self._rho_tensor: Tensor | None = None  # set on the copy returned by prepare()

    def num_features(self, rows: int) -> int:
        return 2 * rows if self.antithetic else rows

    def prepare(
        self,
        q_hat: Tensor,
        k_hat: Tensor,
        *,
        query_padding_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        causal: bool,
    ) -> FeatureMap:
        if self.rho is not None or self._rho_tensor is not None:
            return self  # fixed, or already measured for this call
        if causal:
            raise ValueError(
                "OptimalPositiveFeatures(rho=None) measures rho over all queries and keys, "
                "which would let future keys change past outputs; for causal attention pass a "
                "fixed rho (e.g. OptimalPositiveFeatures(rho=0.25)) or use PositiveFeatures()"
            )
        bound = OptimalPositiveFeatures(antithetic=self.antithetic)
        bound._rho_tensor = mean_pair_rho(q_hat, k_hat, query_padding_mask, key_padding_mask)
        return bound

    def affine(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(W_F (F, d), B, β (…, F))`` with log φ(x̂) = B W_F x̂ + β − |x̂|²/2, β_f = A|ω_f|².

        W_F is ``[W, −W]`` when antithetic; B and β are ``(b, h, 1, 1)``/``(b, h, 1, F)`` for a
        measured ρ, 0-d/``(F,)`` for a fixed one. Also feeds the fused kernel (favor_fused.py).
        """
        rho = self._rho_tensor if self.rho is None else torch.tensor(self.rho, dtype=w.dtype,
                                                                     device=w.device)
        if rho is None:
            raise ValueError(
                "OptimalPositiveFeatures(rho=None) must be prepared with the call's queries "
                "and keys (favor_attention does this); pass a fixed rho to call it directly"
            )
        a = optimal_a(rho.to(w.dtype))
        w_f = torch.cat([w, -w], dim=-2) if self.antithetic else w  # (F, d)
        return w_f, torch.sqrt(1 - 4 * a), a * w_f.square().sum(-1)

    def fused_affine(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.affine(w)

    def __call__(self, x_hat: Tensor, w: Tensor, *, query: bool) -> Tensor:
        w_f, b_coef, bias = self.affine(w)
        logf = torch.matmul(x_hat, w_f.transpose(-2, -1)) * b_coef + bias  # (b, h, n, F)
        if query:
            return logf  # exp(−|q̂|²/2) and D cancel per query
        return logf - x_hat.square().sum(-1, keepdim=True) * 0.5

    def __repr__(self) -> str:
        return f"OptimalPositiveFeatures(rho={self.rho}, antithetic={self.antithetic})"
