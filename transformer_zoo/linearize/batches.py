"""How ``linearize`` feeds the user's batches to a model and reads its final hidden states.

A batch is a dict (``model(**batch)``), a tuple or list (``model(*batch)``) or a tensor
(``model(batch)``); the output is a tensor, a tuple starting with one, or an object with
``last_hidden_state`` (HF). Padding: a dict's ``attention_mask`` or ``mask`` ``(b, n)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class Stream:
    """Batches in order, again from the start when the iterable can be re-iterated."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches, self.it = batches, iter(batches)
        self.reiterable = self.it is not batches
        self.pending: list[Any] = []

    def peek(self) -> Any:
        if not self.pending:
            self.pending.append(self.next())
        return self.pending[0]

    def next(self) -> Any:
        if self.pending:
            return self.pending.pop()
        for again in (False, True):
            if again:
                if not self.reiterable:
                    return None
                self.it = iter(self.batches)
            try:
                return next(self.it)
            except StopIteration:
                continue
        return None


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def hidden(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model output: expected a Tensor, a tuple starting with one or an object "
                    f"with last_hidden_state, got {type(out).__name__}")


def real_rows(batch: Any, hidden: Tensor) -> Tensor | None:
    """``(b, n)`` float, 1 = real token: the batch's attention_mask / mask when it fits."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask", batch.get("mask"))
    if isinstance(mask, Tensor) and tuple(mask.shape) == tuple(hidden.shape[:2]):
        return mask.to(torch.float32)
    return None


def hidden_terms(pred: Tensor, target: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    diff = (pred.float() - target.float()).square().sum(-1)
    ref = target.float().square().sum(-1)
    if rows is not None:
        diff, ref = diff * rows, ref * rows
    return diff.sum(), ref.sum()
