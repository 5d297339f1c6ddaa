"""R-Drop consistency terms between two dropout passes of the same inputs.

    L = CE(P1, y) + CE(P2, y) + α · ½ [KL(P1 ‖ P2) + KL(P2 ‖ P1)]

Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", arXiv 2106.14448,
section 2.
This file holds the α-term: the symmetric KL between the two predictive distributions, taken
per position from logits,

    ½ [KL(p‖q) + KL(q‖p)] = ½ Σ_c (p_c − q_c)(log p_c − log q_c),

and, for regression heads, the squared error between the two predictions (what the paper's
code uses for STS-B).

Shapes: logits ``(b, ..., c)`` (b batch, ``...`` any positions such as tokens, c classes);
predictions ``(b, ...)``. ``mask`` is boolean with **True = real token** (kept); False marks
padding, which contributes nothing. This is the opposite polarity of the official R-Drop code
(its ``pad_mask`` is True = pad) and of ``nn.MultiheadAttention``; it matches the key padding
masks of this library. The mask must broadcast to the position shape (``logits.shape[:-1]``,
or ``pred.shape`` for the squared error).

Reductions over the kept positions: ``"sum"``; ``"mean"`` (sum / number of kept positions,
0 when none is kept); ``"batchmean"`` (sum / b, like ``F.kl_div``); ``"none"`` (per-position
values, masked ones 0).

Exact. log-probabilities come from ``log_softmax`` computed in at least fp32 (fp16/bf16 inputs
are upcast, the result is fp32), so large logits neither overflow nor lose the small
differences. Each summand (p_c − q_c)(log p_c − log q_c) is ≥ 0 even in floating point
(exp is monotone), so the result is never negative.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import (
    check_bool_mask,
    check_broadcastable,
    check_floating,
    check_same_dtype,
    check_tensor,
)

Reduction = Literal["none", "sum", "mean", "batchmean"]
_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str], min_ndim: int, layout: str) -> None:
    for name, t in zip(names, (a, b), strict=True):
        check_tensor(t, name)
        check_floating(t, name)
        if t.ndim < min_ndim:
            raise ValueError(f"{name}: expected {layout}, got shape {tuple(t.shape)}")
    check_same_dtype(names[0], a, names[1], b)
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _reduce_masked(values: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    """Zero the positions where ``mask`` is False, then reduce as documented above.

    ``values`` ``(b, ...)`` per-position losses; ``mask`` broadcastable to it, True = kept.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        check_bool_mask(mask, "mask")
        check_broadcastable(mask, "mask", tuple(values.shape), "positions (b, ...)")
        values = torch.where(mask, values, values.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / values.shape[0]
    count = values.numel() if mask is None else mask.expand_as(values).sum()
    return total / torch.as_tensor(count, device=values.device).clamp_min(1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def symmetric_kl(
    logits_p: Tensor,
    logits_q: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """½ [KL(p‖q) + KL(q‖p)] with p = softmax(logits_p), q = softmax(logits_q) on the last dim.

    Args:
        logits_p, logits_q: ``(b, ..., c)`` logits of the two passes, same shape and dtype.
        mask: boolean, broadcastable to ``(b, ...)``; **True = real token**, False = padding.
        reduction: ``"none" | "sum" | "mean" | "batchmean"`` over the kept positions.

    Returns:
        fp32 (fp64 for fp64 inputs): a scalar, or ``(b, ...)`` for ``"none"``.
    """
    _check_pair(logits_p, logits_q, ("logits_p", "logits_q"), 2, "(batch, ..., classes)")
    dtype = _compute_dtype(logits_p.dtype)
    log_p = F.log_softmax(logits_p.to(dtype), dim=-1)  # (b, ..., c)
    log_q = F.log_softmax(logits_q.to(dtype), dim=-1)
    per_position = 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)  # (b, ...)
    return _reduce_masked(per_position, mask, reduction)


def rdrop_mse(
    pred_p: Tensor,
    pred_q: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """(pred_p − pred_q)², the R-Drop consistency term for regression heads.

    Args:
        pred_p, pred_q: ``(b, ...)`` predictions of the two passes, same shape and dtype.
        mask: boolean, broadcastable to ``(b, ...)``; **True = real element**.
        reduction: ``"none" | "sum" | "mean" | "batchmean"`` over the kept elements
            (``"mean"`` equals ``F.mse_loss`` when no mask is given).
    """
    _check_pair(pred_p, pred_q, ("pred_p", "pred_q"), 1, "(batch, ...)")
    dtype = _compute_dtype(pred_p.dtype)
    per_element = (pred_p.to(dtype) - pred_q.to(dtype)).square()  # (b, ...)
    return _reduce_masked(per_element, mask, reduction)
