"""Kernel adapters for ``transformer_zoo.interop.huggingface`` (no transformers import here).

An adapter sits between HF's attention call and one kernel. HF has already projected (and, for
rotary models, rotated) q, k, v; the adapter receives them in our layout and convention:

- q ``(b, h, n, d)``, k/v ``(b, h|h_kv, m, d)`` (h_kv < h only when ``grouped_kv``);
- ``key_padding_mask`` ``(b, m)`` True = real token (kernels without ``dense_mask``), or
  ``attn_mask`` boolean True = may attend and ``bias`` additive, both broadcastable to
  ``(b, h, n, m)`` (kernels with ``dense_mask``);
- ``causal`` (bottom-right aligned), HF's ``dropout`` and ``scaling``;

and returns ``((b, h, n, d), weights or None)``. Per-module state (a Performer's random matrix)
is created by ``setup`` on the HF attention module, so it is in the model's ``state_dict``.

``KERNELS`` names the built-in adapters. The names, options and defaults are shared with
``interop.swap_attention(model, name, **options)``, which builds each adapter's
``attention_factory`` into ``nn.MultiheadAttention`` models.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from transformer_zoo.attention.hybrid_window import HybridWindowAttention
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.attention.nystrom import NystromAttention
from transformer_zoo.attention.performer import PerformerAttention
from transformer_zoo.attention.softmax import SoftmaxAttention
from transformer_zoo.functional.feature_maps import FeatureMap
from transformer_zoo.functional.softmax import explicit_softmax_attention, softmax_attention


class HFKernel:
    """Adapter protocol. Subclasses are dataclasses: fields are the kernel's options."""

    #: Short kernel name; HF sees it as ``"tz_" + name``.
    name: ClassVar[str]
    #: True: receive HF's dense ``(b, 1, n, m)`` masks (any pattern: causal, sliding window,
    #: packed sequences). False: receive only key padding and the causal flag.
    dense_mask: ClassVar[bool] = False
    #: True: ``attend`` takes k/v with h_kv < h heads; otherwise they are repeated first.
    grouped_kv: ClassVar[bool] = False

    @classmethod
    def hf_name(cls) -> str:
        return f"tz_{cls.name}"

    def setup(self, module: nn.Module, heads: int, head_dim: int) -> None:
        """Attach per-module state to an HF attention module (idempotent). Default: none."""

    def attention_factory(self, layer: int) -> Callable[..., MultiHeadAttention]:
        """The ``MultiHeadAttention`` class or factory with this kernel's options, for attention
        layer ``layer`` (0, 1, ...; seeds per-layer random features): what
        ``swap_attention(model, name, **options)`` builds. Kernels that are only a function
        have none."""
        raise TypeError(f"{type(self).__name__} is a function kernel for Hugging Face models "
                        "only; it has no MultiHeadAttention module to swap in")

    def attend(
        self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, *,
        key_padding_mask: Tensor | None, attn_mask: Tensor | None, bias: Tensor | None,
        causal: bool, dropout: float, scaling: float | None, need_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """See the module docstring for shapes and conventions."""
        raise NotImplementedError

    def recurrent(self, module: nn.Module) -> bool:
        """Whether ``module`` decodes with its own state (``hf_cache.RecurrentLayer``) instead
        of HF's KV cache. Default: no."""
        return False

    def attend_cached(
        self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, layer: object, *,
        key_padding_mask: Tensor | None, scaling: float | None,
    ) -> Tensor:
        """Causal attention of the n new tokens q, k, v ``(b, h, n, d)`` on ``layer.state``
        (``key_padding_mask`` ``(b, n)``); updates the state. Only when ``recurrent``."""
        raise NotImplementedError


@dataclass
class SoftmaxKernel(HFKernel):
    """Exact softmax attention (Vaswani et al. 2017, arXiv 1706.03762) on SDPA.

    Takes every mask HF builds, float biases (``position_bias``) and grouped k/v; returns the
    weights (before dropout) when the model asks for ``output_attentions``.
    """

    name: ClassVar[str] = "softmax"
    dense_mask: ClassVar[bool] = True
    grouped_kv: ClassVar[bool] = True

    def attention_factory(self, layer):
        return SoftmaxAttention

    def attend(self, module, q, k, v, *, key_padding_mask, attn_mask, bias, causal, dropout,
               scaling, need_weights):
        options = dict(mask=attn_mask, bias=bias, causal=causal, dropout_p=dropout, scale=scaling)
        if need_weights:
            return explicit_softmax_attention(q, k, v, training=dropout > 0, **options)
        return softmax_attention(q, k, v, **options), None


class ModuleKernel(HFKernel):
    """Base of adapters that run a ``MultiHeadAttention`` subclass's ``attend``.

    ``setup`` builds the module (``build``) once per HF attention module and keeps only its
    kernel state (buffers such as a random matrix) as ``module.tz_attention``; its own
    projections are dropped, since HF's are used. Per call it sets the module's causal flag and
    dropout rate, and folds HF's ``scaling`` into q: ``q ← q · scaling · √d``, so the kernel's
    ``qᵀk/√d`` equals ``scaling · qᵀk``. Exact as the wrapped kernel is exact. A kernel without
    a causal form raises in ``setup`` (so in ``use``) for a causal HF module.
    """

    def build(self, module: nn.Module, heads: int, head_dim: int) -> MultiHeadAttention:
        """The kernel module for HF attention ``module``: ``attention_factory`` of its
        ``layer_idx``, called as ``factory(h·d, h, head_dim=d)``."""
        factory = self.attention_factory(int(getattr(module, "layer_idx", 0) or 0))
        return factory(heads * head_dim, heads, head_dim=head_dim)

    def setup(self, module, heads, head_dim):
        if isinstance(getattr(module, "tz_attention", None), MultiHeadAttention):
            return
        inner = self.build(module, heads, head_dim)
        if not isinstance(inner, MultiHeadAttention):
            raise TypeError(f"{type(self).__name__}.build must return a transformer_zoo "
                            f"MultiHeadAttention, got {type(inner).__name__}")
        if getattr(module, "is_causal", False) and not inner.supports_causal:
            raise ValueError(_no_causal(type(inner), module))
        inner.q_proj = inner.kv_proj = inner.out_proj = None  # HF's projections are used
        weight = next(module.parameters(), None)
        if weight is not None:
            inner = inner.to(weight.device)
        module.tz_attention = inner.train(module.training)

    def check_causal(self, module: nn.Module, path: str) -> None:
        """Raise ValueError when the attention class has no causal form; ``module`` (at
        ``path``) is a causal HF attention module. Reads the class, builds nothing; a custom
        ``build`` is checked in ``setup`` instead."""
        try:
            factory = self.attention_factory(0)
        except TypeError:
            return
        while isinstance(factory, functools.partial):
            factory = factory.func
        if isinstance(factory, type) and not factory.supports_causal:
            raise ValueError(_no_causal(factory, module, path))

    #: Decode with the kernel's own state when it has one (``recurrent``); False: HF's KV cache.
    recurrent_cache: bool = True

    def recurrent(self, module):
        """True for a causal module whose kernel overrides ``MultiHeadAttention.attend_cached``
        (a state of its own, e.g. ``PerformerAttention``'s ``FavorState``), unless
        ``recurrent_cache`` is False."""
        inner = getattr(module, "tz_attention", None)
        return (bool(self.recurrent_cache) and bool(getattr(module, "is_causal", False))
                and isinstance(inner, MultiHeadAttention)
                and type(inner).attend_cached is not MultiHeadAttention.attend_cached)

    def attend_cached(self, module, q, k, v, layer, *, key_padding_mask, scaling):
        inner: MultiHeadAttention = module.tz_attention
        d, n = q.shape[-1], q.shape[-2]
        if scaling is not None and not math.isclose(scaling, d ** -0.5):
            q = q * (scaling * math.sqrt(d))
        start = layer.consume()
        positions = torch.arange(start, start + n, device=q.device)
        saved = inner.causal
        inner.causal = True
        try:
            out, layer.state = inner.attend_cached(
                q, k, v, layer.state, key_padding_mask=key_padding_mask,
                q_positions=positions, k_positions=positions)
        finally:
            inner.causal = saved
        return out

    def attend(self, module, q, k, v, *, key_padding_mask, attn_mask, bias, causal, dropout,
               scaling, need_weights):
        inner: MultiHeadAttention = module.tz_attention
        if causal and not inner.supports_causal:
            raise ValueError(f"{type(inner).__name__} does not support causal attention, which "
                             f"{type(module).__name__} uses")
        d, n, m = q.shape[-1], q.shape[-2], k.shape[-2]
        if scaling is not None and not math.isclose(scaling, d ** -0.5):
            q = q * (scaling * math.sqrt(d))
        saved = inner.causal, inner.dropout
        inner.causal, inner.dropout = causal, dropout
        try:
            out = inner.attend(
                q, k, v, key_padding_mask=key_padding_mask, attn_mask=None,
                q_positions=torch.arange(m - n, m, device=q.device),
                k_positions=torch.arange(m, device=q.device),
                # self-attention: the padding mask also marks the padded queries
                query_padding_mask=None if getattr(module, "is_cross_attention", False) or n != m
                else key_padding_mask,
            )
        finally:
            inner.causal, inner.dropout = saved
        return out, None


@dataclass
class AttentionKernel(ModuleKernel):
    """Any ``MultiHeadAttention`` subclass or factory, e.g. ``functools.partial(
    PerformerAttention, nb_features=256)``; called as ``attention(h·d, h, head_dim=d)``."""

    name: ClassVar[str] = "module"
    attention: Callable[..., MultiHeadAttention]
    recurrent_cache: bool = True

    def __post_init__(self) -> None:
        check_factory(self.attention, "kernel")

    def attention_factory(self, layer):
        return self.attention


@dataclass
class PerformerKernel(ModuleKernel):
    """FAVOR+ (Choromanski et al. 2021, arXiv 2009.14794) on HF's q, k, v: approximate.

    Each HF attention module holds a ``PerformerAttention`` (``tz_attention``) whose W, seed and
    redraw counter are buffers. With ``seed`` set, layer l draws W from ``(seed, step,
    layer=module.layer_idx)``; with ``seed=None`` every layer takes a seed from torch's global
    generator (reproducible under ``torch.manual_seed``). Causal models run the causal scan;
    decoding with a cache (``generate``, ``use_cache=True``) keeps FAVOR+'s fixed-size state
    per layer (``hf_cache.RecurrentLayer``) instead of keys and values, unless
    ``recurrent_cache=False`` (HF's KV cache; the features of every cached key recomputed per
    token).
    """

    name: ClassVar[str] = "performer"
    nb_features: int = 256
    redraw_interval: int | None = None
    seed: int | None = None
    recurrent_cache: bool = True
    #: a ``FeatureMap`` spec (e.g. ``HedgehogFeatures()``): each layer builds its own from it
    feature_map: FeatureMap | None = None

    def attention_factory(self, layer):
        return functools.partial(PerformerAttention, nb_features=self.nb_features,
                                 redraw_interval=self.redraw_interval, seed=self.seed,
                                 layer=layer, feature_map=self.feature_map)


@dataclass
class NystromKernel(ModuleKernel):
    """Nyström (Xiong et al. 2021, arXiv 2102.03902) on HF's q, k, v: approximate; exact when
    a sample has at most ``num_landmarks`` real tokens (and no convolution).

    ``conv_kernel`` defaults to None: a pretrained model has no trained convolution, and a fresh
    one would only add noise; set it to fine-tune with the paper's residual. ``pinv_iterations``
    and ``pinv_ridge`` as in ``NystromAttention`` (docs/nystrom.md compares them zero-shot).
    Self-attention without causality only (encoders); causal models raise.
    """

    name: ClassVar[str] = "nystrom"
    num_landmarks: int = 64
    pinv_iterations: int | None = 6
    pinv_ridge: float | None = None
    conv_kernel: int | None = None

    def attention_factory(self, layer):
        return functools.partial(NystromAttention, num_landmarks=self.num_landmarks,
                                 pinv_iterations=self.pinv_iterations,
                                 pinv_ridge=self.pinv_ridge, conv_kernel=self.conv_kernel)


@dataclass
class HybridWindowKernel(ModuleKernel):
    """LoLCATs' sliding-window + linear hybrid (Zhang et al. 2024, arXiv 2410.10254) on HF's
    q, k, v: exact softmax over the keys within ``window`` positions (causal: (i − w, i]),
    the feature map's linear attention outside, one normalizer, a learnable window factor per
    head (``HybridWindowAttention``; its parameters live in ``tz_attention``). Approximate
    outside the window; exact softmax when ``window`` covers the sequence. Causal models
    decode on its fixed-size state (``recurrent_cache``)."""

    name: ClassVar[str] = "hybrid_window"
    window: int = 64
    #: a ``FeatureMap`` spec (default ``HedgehogFeatures()``): each layer builds its own
    feature_map: FeatureMap | None = None
    recurrent_cache: bool = True

    def attention_factory(self, layer):
        return functools.partial(HybridWindowAttention, window=self.window,
                                 feature_map=self.feature_map, layer=layer)


#: Built-in kernels by short name: ``huggingface.use(model, name)`` and
#: ``swap_attention(model, name)`` look names up here.
KERNELS: dict[str, type[HFKernel]] = {
    "softmax": SoftmaxKernel, "performer": PerformerKernel, "nystrom": NystromKernel,
    "hybrid_window": HybridWindowKernel,
}


def _no_causal(cls: type, module: nn.Module, path: str = "") -> str:
    where = type(module).__name__ + (f" ({path})" if path else "")
    return (f"{cls.__name__} does not support causal attention, which {where} uses "
            "(is_causal=True); use a kernel with a causal form (\"softmax\", \"performer\")")


def check_factory(attention: object, what: str) -> None:
    """Raise TypeError unless ``attention`` can build modules (a class or factory, not an
    instance or a string)."""
    if isinstance(attention, nn.Module):
        name = type(attention).__name__
        raise TypeError(f"{what}: expected a MultiHeadAttention subclass or factory, got a "
                        f"{name} instance (one module cannot serve every layer); pass {name} "
                        f"or functools.partial({name}, ...) with its options")
    if isinstance(attention, str) or not callable(attention):
        raise TypeError(f"{what}: expected a MultiHeadAttention subclass or factory, got "
                        f"{attention!r}")
