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


def torch_masks(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
    b: int, h: int, n: int, m: int, *, where: str,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool]:
    """``nn.MultiheadAttention``'s masks -> ours.

    Returns (key padding ``(b, m)`` True = real token, attn mask ``(1|b, 1|h, n, m)`` True =
    may attend, float bias of the same shapes or None, causal). A mask equal to the causal
    pattern becomes ``causal=True`` and no attn mask. ``where`` names the module in errors.
    """
    kpm = allowed = bias = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, m):
            raise ValueError(f"{where}: key_padding_mask: expected (N, S) = ({b}, {m}), "
                             f"got {tuple(key_padding_mask.shape)}")
        kpm, kp_bias = to_allowed(key_padding_mask, true_means_attend=False)
        bias = None if kp_bias is None else kp_bias[:, None, None, :]  # (b, 1, 1, m)
    if attn_mask is not None:
        if tuple(attn_mask.shape) == (n, m):
            attn_mask = attn_mask[None, None]  # (1, 1, n, m)
        elif tuple(attn_mask.shape) == (b * h, n, m):
            attn_mask = attn_mask.reshape(b, h, n, m)
        else:
            raise ValueError(f"{where}: attn_mask: expected (L, S) = ({n}, {m}) or "
                             f"(N*num_heads, L, S) = ({b * h}, {n}, {m}), "
                             f"got {tuple(attn_mask.shape)}")
        allowed, am_bias = to_allowed(attn_mask, true_means_attend=False)
        if am_bias is not None:
            bias = am_bias if bias is None else bias + am_bias
        if is_causal_pattern(allowed):
            allowed, is_causal = None, True
        elif is_causal:
            raise ValueError(f"{where}: is_causal=True but attn_mask is not the causal mask; "
                             "pass is_causal=False or the causal mask")
    return kpm, allowed, bias, is_causal
