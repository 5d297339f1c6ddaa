"""The generic decoding cache of causal attention: every key and value seen so far.

    out_t = Attn(q_t, K_≤t, V_≤t)   with K_≤t = [K_cache; k_new] (keys before rotation)

``MultiHeadAttention.attend_cached`` (the default for every kernel) appends the new tokens'
keys, values, positions and padding to a ``KVCache`` and calls the kernel's ``attend`` on all
of them, causal and bottom-right aligned (query i of n new sees keys j <= i + m − n). Keys are
cached *before* any ``QKTransform`` rotation and with their positions, so rotary and bias
encodings (ALiBi, T5, Shaw, …) see exactly what the parallel forward gives them: the result
equals the parallel forward on the whole prefix. Memory and time per token grow with the
length (O(m·d) per head); kernels with a recurrent form (``PerformerAttention``: a
``FavorState`` of O(F·d) per head) override ``attend_cached``.

Shapes: keys/values ``(b, h, m, d)``, positions int64 ``(m,)`` or ``(b, m)``, mask ``(b, m)``
True = real token (None: all real).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values (unrotated), their positions and padding, after ``length`` tokens."""

    keys: Tensor  # (b, h, m, d)
    values: Tensor  # (b, h, m, d)
    positions: Tensor  # (m,) or (b, m) int64
    mask: Tensor | None = None  # (b, m) True = real token

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (grows with ``length``)."""
        tensors = [self.keys, self.values, self.positions] + ([self.mask] if self.mask is not
                                                               None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def index_select(self, index: Tensor) -> KVCache:
        """The cache of the batch rows ``index`` (beam search, batch selection)."""
        index = index.to(self.keys.device)
        pos = self.positions.index_select(0, index) if self.positions.ndim == 2 else self.positions
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return KVCache(self.keys.index_select(0, index), self.values.index_select(0, index),
                       pos, mask)


def _cat_positions(old: Tensor, new: Tensor) -> Tensor:
    if old.ndim == new.ndim:
        return torch.cat([old, new], -1)
    b = max(old.shape[0] if old.ndim == 2 else 1, new.shape[0] if new.ndim == 2 else 1)
    return torch.cat([old.expand(b, -1), new.expand(b, -1)], -1)


def _cat_masks(old: KVCache, new: Tensor | None, b: int, n: int) -> Tensor | None:
    if old.mask is None and new is None:
        return None
    device = old.keys.device
    before = old.mask if old.mask is not None else torch.ones(b, old.length, dtype=torch.bool,
                                                              device=device)
    after = new if new is not None else torch.ones(b, n, dtype=torch.bool, device=device)
    return torch.cat([before, after], -1)


def extend_kv_cache(
    cache: KVCache | None,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None,
    k_positions: Tensor,
) -> KVCache:
    """The cache with n new tokens appended (a new object; the old one is not changed)."""
    if cache is None:
        return KVCache(k, v, k_positions, key_padding_mask)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a KVCache or None, got {type(cache).__name__}")
    if cache.keys.shape[:2] != k.shape[:2] or cache.keys.shape[-1] != k.shape[-1]:
        raise ValueError(f"cache: holds keys {tuple(cache.keys.shape)}, which the new keys "
                         f"{tuple(k.shape)} cannot extend (batch, heads and head_dim differ)")
    b, _, n, _ = k.shape
    return KVCache(torch.cat([cache.keys, k], -2), torch.cat([cache.values, v], -2),
                   _cat_positions(cache.positions, k_positions),
                   _cat_masks(cache, key_padding_mask, b, n))
