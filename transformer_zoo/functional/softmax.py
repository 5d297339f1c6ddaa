"""Standard (softmax) scaled dot-product attention.

    Attention(Q, K, V) = softmax(Q Kᵀ · scale + B + log M) V,      scale = 1/√d by default

Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762.

Shapes: b batch, h query heads, h_kv key/value heads (h_kv divides h: grouped-query attention),
n query length, m key length, d head dim, d_v value head dim.

- q ``(b, h, n, d)``, k ``(b, h_kv, m, d)``, v ``(b, h_kv, m, d_v)`` -> ``(b, h, n, d_v)``.
- ``mask``: boolean, True = may attend, broadcastable to ``(b, h, n, m)``.
- ``bias``: additive logits, broadcastable to ``(b, h, n, m)``.
- Broadcastable: any rank 0..4, trailing dims aligned, each dim equal or 1 (``(m,)`` is one
  value per key, 3-D is ``(h, n, m)``); the same result as the expanded tensor.
- ``causal``: query i may attend key j only when j <= i + (m - n) (bottom-right aligned).

Exact. A query row with no finite logit (every key masked, or a −inf bias on every key the
mask leaves) returns 0 (and gradient 0) in both kernels, never NaN; its weights are 0.
``softmax_attention`` runs on ``F.scaled_dot_product_attention``;
``explicit_softmax_attention`` spells the softmax out and also returns the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import (
    check_bool_mask,
    check_broadcastable,
    check_floating,
    check_nonempty,
    check_probability,
    check_rank,
    check_same_dtype,
)
from transformer_zoo.functional.masks import causal_mask, merge_masks

_LAYOUT = "(batch, heads, seq, head_dim)"


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """Validate the kernel contract; return (b, h, n, m, h_kv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(t, name, 4, _LAYOUT)
        check_floating(t, name)
        check_nonempty(t, name, _LAYOUT)
    if not torch.is_autocast_enabled(q.device.type):  # under autocast, mixed dtypes are cast
        check_same_dtype("q", q, "k", k)
        check_same_dtype("q", q, "v", v)
    b, h, n, d = q.shape
    bk, h_kv, m, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if dk != d:
        raise ValueError(f"q and k must share head_dim: q has {d}, k has {dk}")
    if tuple(v.shape[1:3]) != (h_kv, m):
        raise ValueError(
            f"v must match k in heads and length (b, h_kv, m, d_v) = (*, {h_kv}, {m}, *), "
            f"got {tuple(v.shape)}"
        )
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"key/value heads ({h_kv}) must divide query heads ({h})")
    return b, h, n, m, h_kv


def expand_kv_heads(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: repeat each key/value head for its group of query heads."""
    groups = heads // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Validate; return (k, v with h heads, boolean mask incl. causal or None, 4-D bias or None)."""
    b, h, n, m, _ = check_qkv(q, k, v)
    check_probability(dropout_p, "dropout_p")
    target = (b, h, n, m)
    # Any rank 0..4 broadcasts (trailing dims aligned: (m,) is over keys); both come back as
    # 4-D views, so SDPA and the row guard below never see a rank they would misread.
    if mask is not None:
        check_bool_mask(mask, "mask")
        mask = check_broadcastable(mask, "mask", target, "(b, h, n, m)")
    if bias is not None:
        bias = check_broadcastable(bias, "bias", target, "(b, h, n, m)")
        check_floating(bias, "bias")
    k, v = expand_kv_heads(k, v, h)
    full = merge_masks(mask, causal_mask(n, m, device=q.device) if causal else None)
    return k, v, full, bias


def _guarded_mask(
    full: Tensor | None, bias: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    """The mask both kernels apply, with dead rows opened, and ``live`` ``(.., n, 1)``.

    A row is dead when no logit is left finite: every key masked, or a −inf bias on every key
    the mask leaves. Dead rows are opened (mask all True, bias 0) so the softmax stays finite
    in value and gradient on every backend, and ``live`` zeroes them afterwards. Returns the
    boolean mask when there is no bias, else the additive float mask in ``dtype`` (−inf where
    masked); ``(None, None)`` when there is neither.
    """
    # (bool amax, not any: the same reduction, several times faster on CPU.)
    if bias is None:
        if full is None:
            return None, None
        live = full.amax(dim=-1, keepdim=True)
        return full | ~live, live
    bias = bias.to(dtype)
    keep = bias > float("-inf")  # boolean work first, then a single float pass
    if full is not None:
        keep = keep & full  # broadcasts both
    live = keep.amax(dim=-1, keepdim=True)  # (.., n, 1)
    # fill: −inf on live rows, 0 on dead rows (whose every entry becomes 0)
    fill = torch.zeros(live.shape, dtype=dtype, device=bias.device).masked_fill(live, float("-inf"))
    if full is None:
        return torch.maximum(bias, fill), live  # = where(keep, bias, fill) here, and faster
    return torch.where(keep, bias, fill), live  # −inf where masked, 0 across dead rows


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention on ``F.scaled_dot_product_attention``; see the module docstring.

    Returns ``(b, h, n, d_v)``. Query rows with no finite logit give 0.
    """
    k, v, full, bias = _prepare(q, k, v, mask, bias, causal, dropout_p)
    n, m = q.shape[-2], k.shape[-2]
    if full is None and bias is None:
        # Fast path: SDPA's own causal kernel is top-left aligned, equal to ours when n == m.
        if causal and n != m:
            full = causal_mask(n, m, device=q.device)
        else:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale
            )
    attn_mask, live = _guarded_mask(full, bias, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         scale=scale)
    if live is not None:
        out = out * live  # (b, h, n, d_v); rows without keys -> 0
    return out


def explicit_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    training: bool = True,
) -> tuple[Tensor, Tensor]:
    """The same attention with the softmax written out; returns ``(out, weights)``.

    ``weights`` is ``(b, h, n, m)`` after masking, before dropout; a row with no finite logit
    (fully masked, or all −inf bias) is 0, as is its output.
    Used where the weights themselves are needed (Shaw's value term, ``need_weights``) and as
    a readable reference. Dropout applies to the weights only when ``training``.
    """
    k, v, full, bias = _prepare(q, k, v, mask, bias, causal, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Logits and softmax in fp32 (at least, autocast or not): rounding logits of size
    # |q||k|/√d ~ 100s to bf16 (ulp 0.5-2) would move the weights by O(1) at the q/k norms
    # of real pretrained models.
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        logits = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (b, h, n, m)
    allowed, live = _guarded_mask(full, bias, logits.dtype)  # the same rule as the SDPA path
    if allowed is not None:
        if allowed.dtype == torch.bool:
            logits = logits.masked_fill(~allowed, float("-inf"))
        else:
            logits = logits + allowed  # the bias, −inf where masked, 0 on dead rows
    weights = torch.softmax(logits, dim=-1)
    if live is not None:
        weights = weights * live
    weights = weights.to(v.dtype)
    dropped = F.dropout(weights, p=dropout_p, training=training) if dropout_p > 0 else weights
    return torch.matmul(dropped, v), weights  # (b, h, n, d_v), (b, h, n, m)
