"""The two stages' losses (see ``transfer.py`` for the equations), as ``loss_fn(batch)``.

Stage 1: the mean over trained layers of Σ‖student − teacher‖² / Σ‖teacher‖² (+ Hedgehog's
weights cross-entropy); stage 2: the relative MSE of the final hidden states against the
original model's (+ ``pooled_cosine`` · mean(1 − cos) of the mean-pooled embeddings).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer_zoo.linearize.batches import call, hidden, hidden_terms, real_rows
from transformer_zoo.linearize.teacher_student import Conversion, StopForward, Tap


def transfer_loss(model: nn.Module, conversion: Conversion, layers: list[int],
                   weights_loss: float) -> Callable[[Any], Tensor]:
    def loss_fn(batch: Any) -> Tensor:
        stop = layers[-1] if len(layers) == 1 else None
        with Tap(conversion, "transfer", layers=layers, stop_after=stop,
                 weights_loss=weights_loss > 0) as tap:
            with contextlib.suppress(StopForward):
                call(model, batch)
        total = []
        for layer in layers:
            terms = tap.terms[layer]
            err = torch.stack([e for e, _, _ in terms]).sum()
            ref = torch.stack([r for _, r, _ in terms]).sum().clamp_min(1e-30)
            loss = err / ref
            if weights_loss > 0:
                loss = loss + weights_loss * torch.stack([c for _, _, c in terms]).mean()
            total.append(loss)
        return torch.stack(total).mean()

    return loss_fn


def pooled(h: Tensor, rows: Tensor | None) -> Tensor:
    """``(b, n, d)`` -> ``(b, d)``: the mean over real tokens (all tokens without a mask)."""
    if rows is None:
        return h.float().mean(1)
    w = rows[..., None]
    return (h.float() * w).sum(1) / w.sum(1).clamp_min(1.0)


def finetune_loss(model: nn.Module, conversion: Conversion, original: dict[str, Tensor],
                   pooled_cosine: float = 0.0) -> Callable[[Any], Tensor]:
    def loss_fn(batch: Any) -> Tensor:
        args, kwargs = ((), batch) if isinstance(batch, Mapping) else (
            (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)), {})
        with torch.no_grad(), Tap(conversion, "teacher"):
            target = hidden(torch.func.functional_call(model, original, args, dict(kwargs)))
        pred = hidden(call(model, batch))
        rows = real_rows(batch, target)
        err, ref = hidden_terms(pred, target, rows)
        loss = err / ref.clamp_min(1e-30)
        if pooled_cosine > 0 and pred.ndim == 3:
            cos = F.cosine_similarity(pooled(pred, rows), pooled(target, rows), dim=-1)
            loss = loss + pooled_cosine * (1.0 - cos).mean()
        return loss

    return loss_fn
