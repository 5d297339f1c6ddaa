"""``LearnedFeatureMap``: the base of the learnable feature maps (``learned_feature_maps.py``).

A ``FeatureMap`` that is also an ``nn.Module``: a spec (no parameters) until
``build(n_heads=, head_dim=, projection=)`` gives a layer its own per-head parameters. It
answers ``FeatureMap.tile_parameters()`` with its parameters and ``features_with`` through
``torch.func.functional_call``, so the tiled kernels (``functional/favor_tiled.py``,
``functional/favor_causal_tiled.py``) form its features per tile and differentiate them per
tile, with gradients to those parameters. Shapes: x̂ ``(b, h, n, d)`` -> ``(b, h, n, F)``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_floating, check_positive_int, check_tensor
from transformer_zoo._scripting import refuse_scripting
from transformer_zoo.functional.feature_maps import FeatureMap


class LearnedFeatureMap(nn.Module, FeatureMap):
    """Base of the learnable maps: spec until built, then ``(n_heads, head_dim)`` parameters.

    Subclasses set ``_options()`` (their keyword options), ``_make_parameters(projection)``
    (create and initialise), ``features(x_hat, query=)`` and ``num_features``. The kernel
    calls ``fm(x_hat, w, query=...)``; ``w`` (the kernel's random W) is not read.
    """

    __prepare_scriptable__ = refuse_scripting
    uses_projection: ClassVar[bool] = False

    def __init__(self, n_heads: int | None, head_dim: int | None) -> None:
        super().__init__()
        if (n_heads is None) != (head_dim is None):
            raise ValueError(
                f"{type(self).__name__}: give both n_heads and head_dim (a built map) or "
                f"neither (a spec), got n_heads={n_heads}, head_dim={head_dim}"
            )
        self.n_heads = None if n_heads is None else check_positive_int(n_heads, "n_heads")
        self.head_dim = None if head_dim is None else check_positive_int(head_dim, "head_dim")

    @property
    def built(self) -> bool:
        return self.n_heads is not None

    def _options(self) -> dict[str, Any]:
        raise NotImplementedError

    def features(self, x_hat: Tensor, *, query: bool) -> Tensor:
        raise NotImplementedError

    def build(self, *, n_heads: int, head_dim: int, projection: Tensor) -> LearnedFeatureMap:
        if not self.built:
            return type(self)(**self._options(), n_heads=n_heads, head_dim=head_dim,
                              projection=projection)
        if (self.n_heads, self.head_dim) != (n_heads, head_dim):
            raise ValueError(
                f"{type(self).__name__} was built for (n_heads={self.n_heads}, head_dim="
                f"{self.head_dim}) but this attention has (n_heads={n_heads}, head_dim="
                f"{head_dim}); pass an unbuilt spec, e.g. {type(self).__name__}()"
            )
        return copy.deepcopy(self)

    def _check_built(self) -> None:
        if not self.built:
            raise ValueError(
                f"{type(self).__name__}() is a spec without parameters: pass it to "
                "PerformerAttention(feature_map=...), which builds one per layer, or call "
                ".build(n_heads=..., head_dim=..., projection=...)"
            )

    def forward(self, x_hat: Tensor, w: Tensor | None = None, *, query: bool) -> Tensor:
        """x̂ ``(b, h, n, d)`` -> features (or log-features) ``(b, h, n, F)``; w unused."""
        self._check_built()
        check_tensor(x_hat, "x_hat")
        if x_hat.ndim != 4 or x_hat.shape[1] != self.n_heads or x_hat.shape[-1] != self.head_dim:
            raise ValueError(
                f"x_hat: expected (batch, heads={self.n_heads}, seq, head_dim={self.head_dim})"
                f", got {tuple(x_hat.shape)}"
            )
        check_floating(x_hat, "x_hat")
        return self.features(x_hat, query=query)

    def tile_parameters(self) -> tuple[Tensor, ...]:
        """This map's parameters (the tiled kernels differentiate ``features_with`` on them)."""
        return tuple(self.parameters())

    def features_with(self, parameters: tuple[Tensor, ...], x_hat: Tensor, w: Tensor | None,
                      *, query: bool) -> Tensor:
        """The map with ``parameters`` in place of its own (``torch.func.functional_call``)."""
        names = [name for name, _ in self.named_parameters()]
        swap = dict(zip(names, parameters, strict=True))
        return torch.func.functional_call(self, swap, (x_hat, w), {"query": query})

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self._options().items())
        sizes = f"n_heads={self.n_heads}, head_dim={self.head_dim}" if self.built else "spec"
        return f"{sizes}, {opts}" if opts else sizes
