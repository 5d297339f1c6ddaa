"""Random feature maps φ for FAVOR+ (Performer): positive softmax, hyperbolic, generalized.

With x̂ = d^(−1/4) x and W ``(r, d)`` (rows w_j), the softmax kernel exp(q̂ᵀk̂) = exp(qᵀk/√d)
is estimated by φ(q̂)ᵀφ(k̂) with

- ``PositiveFeatures``:   φ(x̂) = r^(−1/2) exp(W x̂ − |x̂|²/2)                       (F = r)
- ``HyperbolicFeatures``: φ(x̂) = (2r)^(−1/2) exp(−|x̂|²/2) [exp(W x̂), exp(−W x̂)]   (F = 2r)

both positive and unbiased (Choromanski et al. 2021, "Rethinking Attention with Performers",
arXiv 2009.14794, Lemma 1 and eq. 7). ``OptimalPositiveFeatures`` (FAVOR++, file
``feature_maps_optimal.py``) adds a variance-minimising data-dependent parameter.
``GeneralizedFeatures(fn)``: φ(x̂) = fn(W x̂) for a non-negative ``fn`` (ReLU by default), the
paper's generalized attention — a different kernel, not an estimate of softmax.

Exponential maps return their *log*-features; the attention kernel subtracts stabilizers and
exponentiates (in fp32). Constant factors (r^(−1/2)) and, on the query side, any per-token
factor (exp(−|q̂|²/2)) cancel between numerator and denominator, so ``query=True`` omits them
— exactly, not approximately. Shapes: x̂ ``(b, h, n, d)``, W ``(r, d)`` -> ``(b, h, n, F)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor


class FeatureMap:
    """Base class: ``fm(x_hat, w, query=...)`` -> log-features (exponential maps) or features."""

    #: True when ``__call__`` returns log φ (the kernel stabilizes and exponentiates).
    exponential: ClassVar[bool] = True

    #: False when the map holds its own parameters and never reads the kernel's random W
    #: (learnable maps, ``transformer_zoo.attention.learned_feature_maps``): redrawing W
    #: would change nothing, so ``PerformerAttention`` refuses ``redraw_interval`` for it.
    uses_projection: ClassVar[bool] = True

    def num_features(self, rows: int) -> int:
        """F, the feature count produced from a W with ``rows`` rows."""
        return rows

    def build(self, *, n_heads: int, head_dim: int, projection: Tensor) -> FeatureMap:
        """The map one attention layer uses, sized for its ``(n_heads, head_dim)``.

        ``PerformerAttention.__init__`` calls it, so the map it is given is a spec: stateless
        maps return ``self`` (sharing one is harmless); learnable maps return a fresh module
        with this layer's own parameters (``projection``, the layer's W ``(r, head_dim)`` at
        redraw step 0, initialises maps that start from FAVOR+'s random features).
        """
        return self

    def prepare(
        self,
        q_hat: Tensor,
        k_hat: Tensor,
        *,
        query_padding_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        causal: bool,
    ) -> FeatureMap:
        """The map to use for one attention call (data-dependent maps fix parameters here).

        q̂ ``(b, h, n, d)``, k̂ ``(b, h, m, d)``; masks ``(b, n)``/``(b, m)``, True = real token.
        """
        return self

    def __call__(self, x_hat: Tensor, w: Tensor, *, query: bool) -> Tensor:
        raise NotImplementedError

    def fused_affine(self, w: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """``(W_F, B, β)`` when log φ(x̂) = B W_F x̂ + β − |x̂|²/2 (the query side without
        −|x̂|²/2), for the fused kernels (``favor_fused.py``, ``favor_causal_fused.py``, which
        form the features themselves, tile by tile); None (default): no such form, the
        kernel calls the map. W_F ``(F, d)`` or per head ``(h, F, d)``; B None, 0-d or
        ``(b, h, 1, 1)``; β None, ``(F,)`` or ``(b, h, 1, F)``. A subclass that redefines
        ``__call__`` without redefining this gets None (its map is no longer this form)."""
        return None

    def tile_parameters(self) -> tuple[Tensor, ...] | None:
        """The tensors φ reads besides x̂ and W (a learnable map: its parameters), for the
        kernels that form features tile by tile and recompute them in backward
        (``favor_tiled.py``, ``favor_causal_tiled.py``): they pass these through autograd and
        call ``features_with`` on them, so gradients reach them exactly. None (default): not
        known, the kernel keeps the ``(b, h, n, F)`` features for backward instead. A map that
        answers must be row-wise (each token's features from its own x̂ alone, after
        ``prepare``). A subclass that redefines ``__call__`` without redefining this gets None."""
        return None

    def features_with(self, parameters: tuple[Tensor, ...], x_hat: Tensor, w: Tensor, *,
                      query: bool) -> Tensor:
        """``self(x_hat, w, query=query)`` computed from ``parameters`` (the tensors
        ``tile_parameters()`` returned, or stand-ins of the same shapes) instead of the map's
        own: what the tiled kernels differentiate. Default: a map without tensors."""
        if parameters:
            raise NotImplementedError(
                f"{type(self).__name__}.tile_parameters() returned tensors: define "
                "features_with to compute the features from them")
        return self(x_hat, w, query=query)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in vars(cls) and "fused_affine" not in vars(cls):
            cls.fused_affine = FeatureMap.fused_affine
        if "__call__" in vars(cls) and "tile_parameters" not in vars(cls):
            cls.tile_parameters = FeatureMap.tile_parameters

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _half_sq_norm(x_hat: Tensor) -> Tensor:
    return x_hat.square().sum(-1, keepdim=True) * 0.5  # (b, h, n, 1)


class PositiveFeatures(FeatureMap):
    """log φ(x̂) = W x̂ − |x̂|²/2 (the FAVOR+ default; query side drops −|x̂|²/2)."""

    def __call__(self, x_hat: Tensor, w: Tensor, *, query: bool) -> Tensor:
        proj = torch.matmul(x_hat, w.transpose(-2, -1))  # (b, h, n, r)
        return proj if query else proj - _half_sq_norm(x_hat)

    def fused_affine(self, w: Tensor) -> tuple[Tensor, None, None]:
        return w, None, None


class HyperbolicFeatures(FeatureMap):
    """log φ(x̂) = [W x̂, −W x̂] − |x̂|²/2: F = 2r features, lower variance (paper eq. 7)."""

    def num_features(self, rows: int) -> int:
        return 2 * rows

    def __call__(self, x_hat: Tensor, w: Tensor, *, query: bool) -> Tensor:
        proj = torch.matmul(x_hat, w.transpose(-2, -1))  # (b, h, n, r)
        both = torch.cat([proj, -proj], dim=-1)  # (b, h, n, 2r)
        return both if query else both - _half_sq_norm(x_hat)

    def fused_affine(self, w: Tensor) -> tuple[Tensor, None, None]:
        return torch.cat([w, -w], dim=-2), None, None


class GeneralizedFeatures(FeatureMap):
    """φ(x̂) = fn(W x̂) with a non-negative ``fn`` (default ReLU): generalized attention."""

    exponential = False

    def __init__(self, fn: Callable[[Tensor], Tensor] = torch.relu) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, x_hat: Tensor, w: Tensor, *, query: bool) -> Tensor:
        return self.fn(torch.matmul(x_hat, w.transpose(-2, -1)))  # (b, h, n, r)

    def __repr__(self) -> str:
        return f"GeneralizedFeatures(fn={getattr(self.fn, '__name__', self.fn)!s})"
