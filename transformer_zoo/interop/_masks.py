"""Mask conversions between other libraries' conventions and ours (True = may attend).

- ``nn.MultiheadAttention``: boolean masks mean True = *masked out*; float masks are added to
  the logits (``nn.TransformerEncoderLayer`` turns boolean masks into 0 / -inf floats first).
- Hugging Face: boolean masks mean True = attend (``sdpa_mask``); float masks are 0 where a key
  is attended and ``finfo(dtype).min`` where it is not (``eager_mask``).

A float additive mask splits exactly into a boolean part (entries at -inf or at the dtype's
lowest value are blocked) and a residual bias (every other entry). The residual is ``None``
when it is all zeros, which is the case for every mask the two libraries build themselves.

Shapes: b batch, h heads, n query length, m key length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo.functional.masks import causal_mask


def split_additive(mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Float additive mask -> (allowed, bias): allowed is True where the entry is not blocked.

    Blocked entries are -inf or ``<= finfo(dtype).min``; ``bias`` holds every other entry
    (None when they are all 0). Exact: ``softmax(s + mask) == softmax(s + bias | allowed)``.
    """
    blocked = mask <= torch.finfo(mask.dtype).min  # -inf is below min too
    residual = mask.masked_fill(blocked, 0.0)
    return ~blocked, (residual if bool(residual.ne(0).any()) else None)


def to_allowed(mask: Tensor, *, true_means_attend: bool) -> tuple[Tensor, Tensor | None]:
    """A boolean mask in either polarity, or a float additive mask -> (allowed, bias)."""
    if mask.dtype == torch.bool:
        return (mask if true_means_attend else ~mask), None
    if not mask.is_floating_point():
        raise TypeError(f"expected a boolean or floating-point mask, got dtype {mask.dtype}")
    return split_additive(mask)


def is_causal_pattern(allowed: Tensor) -> bool:
    """True when ``allowed (..., n, m)`` is the causal mask (bottom-right aligned) everywhere."""
    n, m = allowed.shape[-2:]
    return bool((allowed == causal_mask(n, m, device=allowed.device)).all())
