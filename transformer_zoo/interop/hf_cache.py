"""Hugging Face (5.x) decoding cache holding a kernel's own state: FAVOR+'s fixed-size recurrence.

    S_t = diag(e^{g_(t−1) − g_t}) S_(t−1) + φ̃(k_t) v_tᵀ,   z_t = … + φ̃(k_t),
    out_t = φ̃(q_t)ᵀ S_t / φ̃(q_t)ᵀ z_t            (``functional/favor_decode.py``)

Causal linear attention (Katharopoulos et al. 2020, arXiv 2006.16236; Performer: Choromanski
et al. 2021, arXiv 2009.14794) decodes with a state of fixed size per head — S ``(b, h, F, d)``,
z ``(b, h, F)`` and the per-feature running key max g ``(b, h, F)`` — instead of a KV cache
that grows with the text: each new token costs O(F·d) per head, whatever the length.

``RecurrentLayer`` is an HF ``CacheLayerMixin`` for one attention layer whose transformer_zoo
kernel has its own ``attend_cached`` (``PerformerAttention``): HF's ``cache.update(k, v, i)``
hands it the new tokens' keys and values (counted for ``get_seq_length`` and the masks, stored
nowhere), and the attention function then runs ``attend_cached`` on them with q: the prompt
in one parallel pass (``favor_prefill``: the parallel causal kernel and one reduction for the
state), each later token one O(F·d) step. Padded keys (left padding) never enter the state.
Exact: equal, to rounding, to the kernel run on the whole prefix without a cache.

``use(model, "performer")`` makes this automatic: a forward pre-hook on each HF attention
module (``bind_cache``) replaces the module's still-empty ``DynamicLayer`` in whatever cache
the model receives (the ``DynamicCache`` ``generate()`` or ``forward(use_cache=True)``
creates, or one passed in) by a ``RecurrentLayer``. Layers whose kernel has no recurrent form
(softmax, HF's own attention) keep their ``DynamicLayer``: mixed models work. ``RecurrentCache``
is a ``DynamicCache`` built that way up front. Not supported: ``crop`` (assisted decoding
rolls back; a recurrent state cannot), static caches (use the default dynamic one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

__all__ = ["RecurrentCache", "RecurrentLayer", "bind_cache", "cache_nbytes"]


class RecurrentLayer(CacheLayerMixin):
    """One layer's decoding state (``state``: a ``FavorState`` for Performer), not its keys.

    ``update`` records the new keys/values for the attention call that follows and counts
    them (``get_seq_length``: every token seen, padding included, as ``DynamicLayer``);
    ``consume`` gives them to that call, which stores the kernel's new state.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.state: Any = None
        self.length = 0
        self.pending: tuple[Tensor, Tensor] | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Count the new tokens and hand back their k, v (not the past: the state holds it)."""
        if self.pending is not None:
            raise RuntimeError(
                "RecurrentLayer: the previous update's keys never reached a transformer_zoo "
                "kernel (was the attention implementation changed after use()?); a recurrent "
                "state cannot serve other attention implementations: pass a fresh DynamicCache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        self.length += key_states.shape[-2]
        return key_states, value_states

    def holds(self, key: Tensor) -> bool:
        """Whether ``key`` is the block the last ``update`` handed out, not yet consumed."""
        return self.pending is not None and self.pending[0] is key

    def consume(self) -> int:
        """Mark the pending block used; return the number of tokens before it."""
        n = self.pending[0].shape[-2]
        self.pending = None
        return self.length - n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of the state (constant in the length for a recurrent kernel)."""
        return 0 if self.state is None else int(self.state.nbytes())

    def offload(self) -> None:  # a fixed-size state: stays where it is
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.state, self.length, self.pending = None, 0, None

    def _select(self, index: Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:  # the batch size: the state's first tensor's first dim
            b = next(t for t in vars(self.state).values() if isinstance(t, Tensor)).shape[0]
            self._select(torch.arange(b).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(torch.as_tensor(indices).reshape(-1))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(
                "RecurrentLayer: a recurrent state cannot be cropped (assisted decoding or "
                "rollback); decode without an assistant, or use the KV cache "
                "(use(model, 'performer', recurrent_cache=False))"
            )


def _self_attention_cache(cache: object) -> Cache | None:
    inner = getattr(cache, "self_attention_cache", None)  # EncoderDecoderCache
    cache = inner if isinstance(inner, Cache) else cache
    return cache if isinstance(cache, Cache) else None


def recurrent_layer(cache: object, layer_idx: int) -> RecurrentLayer | None:
    """The ``RecurrentLayer`` at ``layer_idx`` of ``cache``, putting one in place of a still
    empty ``DynamicLayer``; None when that layer already holds keys (or another kind)."""
    cache = _self_attention_cache(cache)
    if cache is None:
        return None
    while len(cache.layers) <= layer_idx and cache.layer_class_to_replicate is not None:
        cache.layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if type(layer) is DynamicLayer and not layer.is_initialized:
        layer = cache.layers[layer_idx] = RecurrentLayer()
    return layer if isinstance(layer, RecurrentLayer) else None


def bind_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook (``use`` registers it): point ``module.tz_cache_layer`` at the
    ``RecurrentLayer`` of the cache this call received, when its kernel is recurrent and the
    model runs it; otherwise None (the ordinary KV path)."""
    module.tz_cache_layer = None
    kernel = getattr(module, "tz_kernel", None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    config = getattr(module, "config", None)
    if cache is None or kernel is None or getattr(module, "is_cross_attention", False):
        return
    if getattr(config, "_attn_implementation", None) != kernel.hf_name():
        return
    if not kernel.recurrent(module):
        return
    layer_idx = getattr(module, "layer_idx", None)
    if isinstance(layer_idx, int):
        module.tz_cache_layer = recurrent_layer(cache, layer_idx)


def unbind_cache(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    """Forward hook: the binding lasts one call."""
    module.tz_cache_layer = None


class RecurrentCache(DynamicCache):
    """A ``DynamicCache`` with a ``RecurrentLayer`` for every attention layer of ``model``
    whose kernel is recurrent (after ``use(model, "performer")``), ``DynamicLayer`` elsewhere.
    Pass it as ``generate(..., cache=RecurrentCache(model))``; ``use`` already does this for
    the caches HF creates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(config=model.config)
        for module in model.modules():
            kernel = getattr(module, "tz_kernel", None)
            idx = getattr(module, "layer_idx", None)
            if kernel is not None and isinstance(idx, int) and kernel.recurrent(module) \
                    and not getattr(module, "is_cross_attention", False):
                recurrent_layer(self, idx)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: keys/values of KV layers plus recurrent states."""
    total = 0
    for layer in _self_attention_cache(cache).layers:
        if isinstance(layer, RecurrentLayer):
            total += layer.nbytes()
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
    return total
