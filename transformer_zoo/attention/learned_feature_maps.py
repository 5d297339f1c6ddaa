"""Learnable feature maps for ``PerformerAttention``: per-head parameters, trained like weights.

Per head h, on the head's query or key x (Hedgehog, T2R: the papers' maps on q and k as the
model computes them) or on FAVOR+'s x̂ = d^(−1/4) x (learned-W FAVOR+):

- ``HedgehogFeatures`` (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear
  Attentions with Softmax Mimicry", arXiv 2402.04347):
      φ(x) = [softmax(xW_h + b_h), softmax(−(xW_h + b_h))],  W_h ``(d, d_f)`` = I, b_h = 0 at init
  with separate maps for queries and keys (as in the paper's code; ``shared_qk=True``: one).
- ``T2RFeatures`` (Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs",
  arXiv 2103.13076):   φ(x) = ReLU(W_h x + b_h),  W_h ``(F, d)`` random at init.
- ``LearnedPositiveFeatures``: FAVOR+'s positive features with W trained (Choromanski et al.
  2021, arXiv 2009.14794):  φ(x̂) ∝ exp(W_h x̂ − |x̂|²/2),  every W_h = the layer's random
  W at init, so at step 0 it *is* FAVOR+ (the same unbiased estimate, bit for bit).

Exact vs approximate: the kernel computes each map's linear attention exactly (the same
stabilised kernel as FAVOR+: bidirectional, causal, padding, the decode step). None is an
estimate of softmax attention until trained (Hedgehog and T2R define other kernels; learned-W
FAVOR+ starts as the Monte Carlo estimate and drifts from it as W trains) — attention
transfer (``transformer_zoo.linearize``) trains them to mimic the model's softmax.

A map passed to ``PerformerAttention(feature_map=...)`` is a spec: each attention builds its
own (``FeatureMap.build``), sized for its (n_heads, head_dim), owned as the submodule
``feature_map`` (in ``state_dict``, moved by ``.to``). So
``functools.partial(PerformerAttention, feature_map=HedgehogFeatures())`` gives every layer
its own parameters. A map built already (``n_heads=``/``head_dim=`` given) is copied, like
``nn.TransformerEncoder`` copies its layer. Shapes: the kernel calls every ``FeatureMap`` on
x̂ = d^(−1/4) x ``(b, h, n, d)``; Hedgehog and T2R undo that scale (x = d^(1/4) x̂) before
their formula. Output ``(b, h, n, F)``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_floating, check_positive_int, check_tensor
from transformer_zoo.attention.learned_feature_map_base import LearnedFeatureMap
from transformer_zoo.functional.feature_maps_learned import (
    hedgehog_log_features,
    learned_positive_log_features,
    t2r_features,
)


def _check_feature_dim(value: int | None) -> int | None:
    return None if value is None else check_positive_int(value, "feature_dim")


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


class HedgehogFeatures(LearnedFeatureMap):
    """Hedgehog: φ(x) = [softmax(xW + b), softmax(−(xW + b))] per head (arXiv 2402.04347).

    Args (keyword-only):
        feature_dim: d_f (default head_dim); F = 2·d_f features. W ``(h, d, d_f)`` starts at
            the (rectangular) identity, b ``(h, d_f)`` at 0.
        bias: learn b (True) or not.
        shared_qk: one map for queries and keys (False: two, ``query_*`` and ``key_*``
            parameters, as in the paper's code; True: ``weight``/``bias``).
        n_heads, head_dim: build now (otherwise ``PerformerAttention`` builds it).

    Returned as log-features, [log_softmax(z), log_softmax(−z)]: the kernel's stabilisers
    then keep attention exact at norms where softmax(z) underflows in fp32 (tested).
    x is the head's query or key itself (called on the kernel's x̂ = d^(−1/4) x, the map
    multiplies by d^(1/4) first), so at the identity init φ(q) = [softmax(q), softmax(−q)]
    exactly as in the paper's code.
    """

    def __init__(
        self,
        *,
        feature_dim: int | None = None,
        bias: bool = True,
        shared_qk: bool = False,
        n_heads: int | None = None,
        head_dim: int | None = None,
        projection: Tensor | None = None,
    ) -> None:
        super().__init__(n_heads, head_dim)
        self.feature_dim = _check_feature_dim(feature_dim)
        self.has_bias = _check_bool(bias, "bias")
        self.shared_qk = _check_bool(shared_qk, "shared_qk")
        if self.built:
            f = self.head_dim if self.feature_dim is None else self.feature_dim
            names = ("",) if self.shared_qk else ("query_", "key_")
            for p in names:
                self.register_parameter(
                    p + "weight", nn.Parameter(torch.empty(self.n_heads, self.head_dim, f)))
                b = nn.Parameter(torch.empty(self.n_heads, f)) if self.has_bias else None
                self.register_parameter(p + "bias", b)
            self.reset_parameters()

    def _options(self) -> dict[str, Any]:
        return {"feature_dim": self.feature_dim, "bias": self.has_bias, "shared_qk": self.shared_qk}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W = I (rectangular: ones on the diagonal), b = 0."""
        for name, p in self.named_parameters(recurse=False):
            if name.endswith("weight"):
                p.copy_(torch.eye(p.shape[-2], p.shape[-1], device=p.device, dtype=p.dtype))
            else:
                p.zero_()

    def _params(self, query: bool) -> tuple[Tensor, Tensor | None]:
        p = "" if self.shared_qk else ("query_" if query else "key_")
        return getattr(self, p + "weight"), getattr(self, p + "bias")

    def num_features(self, rows: int) -> int:
        self._check_built()
        return 2 * (self.head_dim if self.feature_dim is None else self.feature_dim)

    def features(self, x_hat: Tensor, *, query: bool) -> Tensor:
        return hedgehog_log_features(x_hat * self.head_dim ** 0.25, *self._params(query))


class T2RFeatures(LearnedFeatureMap):
    """T2R: φ(x) = ReLU(W x + b) per head (Kasai et al. 2021, arXiv 2103.13076).

    Args (keyword-only):
        feature_dim: F (default: the attention's ``nb_features``). W ``(h, F, d)`` and b
            ``(h, F)`` start random, U(−1/√d, 1/√d) (``nn.Linear``'s default; the paper
            learns φ from a random init).
        bias: learn b (True) or not.
        shared_qk: one φ for queries and keys (True, the paper's sim(x, y) = φ(x)·φ(y)) or
            two (``query_*``/``key_*`` parameters).
        n_heads, head_dim: build now (then ``feature_dim`` is required).

    x is the head's query or key (the map undoes the kernel's d^(−1/4)). Plain features (not
    exponential): a query whose features are all 0 against every key gets output 0.
    """

    exponential: ClassVar[bool] = False

    def __init__(
        self,
        *,
        feature_dim: int | None = None,
        bias: bool = True,
        shared_qk: bool = True,
        n_heads: int | None = None,
        head_dim: int | None = None,
        projection: Tensor | None = None,
    ) -> None:
        super().__init__(n_heads, head_dim)
        self.feature_dim = _check_feature_dim(feature_dim)
        self.has_bias = _check_bool(bias, "bias")
        self.shared_qk = _check_bool(shared_qk, "shared_qk")
        if self.built:
            f = self.feature_dim
            if f is None:
                if projection is None:
                    raise ValueError("T2RFeatures: give feature_dim (F) to build it directly")
                f = projection.shape[0]
            self.feature_dim = f
            for p in ("",) if self.shared_qk else ("query_", "key_"):
                self.register_parameter(
                    p + "weight", nn.Parameter(torch.empty(self.n_heads, f, self.head_dim)))
                b = nn.Parameter(torch.empty(self.n_heads, f)) if self.has_bias else None
                self.register_parameter(p + "bias", b)
            self.reset_parameters()

    def _options(self) -> dict[str, Any]:
        return {"feature_dim": self.feature_dim, "bias": self.has_bias, "shared_qk": self.shared_qk}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W, b ~ U(−1/√d, 1/√d) from torch's global generator."""
        bound = 1 / math.sqrt(self.head_dim)
        for p in self.parameters(recurse=False):
            p.uniform_(-bound, bound)

    def _params(self, query: bool) -> tuple[Tensor, Tensor | None]:
        p = "" if self.shared_qk else ("query_" if query else "key_")
        return getattr(self, p + "weight"), getattr(self, p + "bias")

    def num_features(self, rows: int) -> int:
        self._check_built()
        return self.feature_dim

    def features(self, x_hat: Tensor, *, query: bool) -> Tensor:
        return t2r_features(x_hat * self.head_dim ** 0.25, *self._params(query))


class LearnedPositiveFeatures(LearnedFeatureMap):
    """FAVOR+'s positive features with a trained per-head W: log φ(x̂) = W_h x̂ − |x̂|²/2.

    W ``(h, r, d)`` (``weight``) starts with every head equal to the layer's random W at
    redraw step 0 (``projection``: orthogonal rows, chi(d) norms, from the attention's seed
    and layer), so the untrained map equals ``PositiveFeatures()`` with that W; one W for
    queries and keys (FAVOR+'s estimator). Built directly: ``LearnedPositiveFeatures(
    n_heads=h, head_dim=d, projection=draw_projection(r, d, seed=0))``.
    ``reset_parameters`` returns to that initial W (kept as a CPU copy, not in state_dict).
    """

    def __init__(
        self,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        projection: Tensor | None = None,
    ) -> None:
        super().__init__(n_heads, head_dim)
        if self.built:
            check_tensor(projection, "projection")
            if projection.ndim != 2 or projection.shape[-1] != self.head_dim:
                raise ValueError(
                    f"projection: expected (nb_features, head_dim={self.head_dim}), got "
                    f"{tuple(projection.shape)}"
                )
            check_floating(projection, "projection")
            self._initial = projection.detach().to("cpu", copy=True)
            r = projection.shape[0]
            self.weight = nn.Parameter(torch.empty(self.n_heads, r, self.head_dim))
            self.reset_parameters()

    def _options(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every head's W back to the initial random W."""
        self.weight.copy_(self._initial.to(self.weight.dtype).expand_as(self.weight))

    def num_features(self, rows: int) -> int:
        self._check_built()
        return self.weight.shape[-2]

    def features(self, x_hat: Tensor, *, query: bool) -> Tensor:
        return learned_positive_log_features(x_hat, self.weight, query=query)
