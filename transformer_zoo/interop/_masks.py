"""Mask conversions between other libraries' conventions and ours (True = may attend).

- ``nn.MultiheadAttention``: boolean masks mean True = *masked out*; float masks are added to
  the logits (``nn.TransformerEncoderLayer`` turns boolean masks into 0 / -inf floats first).
- Hugging Face: boolean masks mean True = attend (``sdpa_mask``); float masks are 0 where a key
  is attended and ``finfo(dtype).min`` where it is not (``eager_mask``).

A float additive mask splits exactly into a boolean part (entries at -inf or at the dtype's
lowest value are blocked) and a residual bias (every other entry). The residual is all zeros
for every mask the two libraries build themselves; ``settle_bias`` drops it then.

Under ``torch.compile`` / ``torch.export`` nothing here branches on tensor values (a graph
break, or an export failure): what eager code decides by looking at the values (is the bias
zero? is the attn_mask the causal pattern?) is decided from static facts (the kernel takes a
bias; ``is_causal=True``) and the assumptions are checked at run time with
``torch._assert_async``, which raises with our message.

Shapes: b batch, h heads, n query length, m key length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo.functional.masks import causal_mask


def split_additive(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Float additive mask -> (allowed, bias): allowed is True where the entry is not blocked.

    Blocked entries are -inf or ``<= finfo(dtype).min``; ``bias`` holds every other entry (0
    at blocked ones). Exact: ``softmax(s + mask) == softmax(s + bias | allowed)``.
    """
    blocked = mask <= torch.finfo(mask.dtype).min  # -inf is below min too
    return ~blocked, mask.masked_fill(blocked, 0.0)


def settle_bias(bias: Tensor | None, *, takes_bias: bool, message: str) -> Tensor | None:
    """The additive bias a kernel should get, or None.

    Eager: None when ``bias`` is all zeros (purely boolean masks), else ``bias`` (the caller
    rejects it for a kernel that takes no bias). Traced (compile/export), with no branch on
    values: kept as is for a kernel that ``takes_bias`` (adding zeros changes nothing);
    otherwise dropped after a run-time check that it is all zeros, raising ``message``.
    """
    if bias is None:
        return None
    if not torch.compiler.is_compiling():
        return bias if bool(bias.ne(0).any()) else None
    if takes_bias:
        return bias
    torch._assert_async(bias.eq(0).all(), message)
    return None


def to_allowed(mask: Tensor, *, true_means_attend: bool) -> tuple[Tensor, Tensor | None]:
    """A boolean mask in either polarity, or a float additive mask -> (allowed, bias).

    ``bias`` is None for boolean masks (see ``settle_bias`` for float ones).
    """
    if mask.dtype == torch.bool:
        return (mask if true_means_attend else ~mask), None
    if not mask.is_floating_point():
        raise TypeError(f"expected a boolean or floating-point mask, got dtype {mask.dtype}")
    return split_additive(mask)


def is_causal_pattern(allowed: Tensor) -> bool:
    """True when ``allowed (..., n, m)`` is the causal mask (bottom-right aligned) everywhere.

    Reads the values: eager only.
    """
    n, m = allowed.shape[-2:]
    return bool((allowed == causal_mask(n, m, device=allowed.device)).all())


def torch_masks(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
    b: int, h: int, n: int, m: int, *, takes_bias: bool, where: str,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool]:
    """``nn.MultiheadAttention``'s masks -> ours.

    Returns (key padding ``(b, m)`` True = real token, attn mask ``(1|b, 1|h, n, m)`` True =
    may attend, float bias of the same shapes or None, causal). ``takes_bias``: whether the
    kernel accepts an additive bias (``Place.BIAS``). ``where`` names the module in errors.

    Eager: a mask equal to the causal pattern becomes ``causal=True`` and no attn mask, and
    an all-zero bias becomes None. Traced (compile/export): the causal pattern is recognised
    from ``is_causal=True`` only (checked at run time); a bias stays (``settle_bias``).
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
        not_causal = (f"{where}: is_causal=True but attn_mask is not the causal mask; pass "
                      "is_causal=False or the causal mask")
        if torch.compiler.is_compiling():
            if is_causal:  # torch's contract: the hint says the mask is causal; we check it
                causal = causal_mask(n, m, device=allowed.device)
                torch._assert_async((allowed == causal).all(), not_causal)
                allowed = None
        elif is_causal_pattern(allowed):
            allowed, is_causal = None, True
        elif is_causal:
            raise ValueError(not_causal)
    bias = settle_bias(bias, takes_bias=takes_bias, message=(
        f"{where}: got a float additive mask with values other than 0 and -inf; this kernel "
        "supports only key padding masks and the causal mask"))
    return kpm, allowed, bias, is_causal
