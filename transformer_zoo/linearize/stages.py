"""Stage configurations of ``linearize``: ``AttentionTransfer`` (stage 1), ``Finetune`` (stage 2).

Frozen dataclasses, checked when built (ValueError / TypeError naming what was expected).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

Trainable = str | Sequence[str] | Callable[[str, nn.Parameter], bool] | None
Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES = ("constant", "linear", "cosine")


def _check_budget(steps: object, seconds: object, lr: object) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or seconds < 0):
        raise ValueError(f"seconds: expected a number >= 0 or None, got {seconds!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr: expected a number > 0, got {lr!r}")


def _check_schedule(schedule: object, warmup: object) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if (isinstance(warmup, bool) or not isinstance(warmup, (int, float))
            or not 0 <= warmup < 1):
        raise ValueError(f"warmup: expected a fraction of the budget in [0, 1), got {warmup!r}")


def lr_factor(progress: float, schedule: Schedule, warmup: float) -> float:
    """The learning-rate multiplier at ``progress`` ∈ [0, 1] of the stage's budget: linear
    warm-up from 0 over the first ``warmup`` of it, then ``"constant"`` (1), ``"linear"``
    (1 → 0) or ``"cosine"`` (½(1 + cos πt) → 0) over the rest, t the progress after warm-up."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return max(p / warmup, 1e-3)
    t = (p - warmup) / (1 - warmup)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


@dataclass(frozen=True)
class AttentionTransfer:
    """Stage 1: train the student attentions' own parameters against softmax, layer by layer.

    Attributes:
        steps: optimizer steps (per layer with ``layerwise``); seconds: time budget (split
            evenly over the layers with ``layerwise``), None for none. The first reached stops.
        lr: AdamW learning rate (LoLCATs: 1e-2 for feature maps), no weight decay.
        layerwise: train layer 0, then 1, ... (each forward stops after the trained layer),
            instead of all layers at once.
        weights_loss: weight of Hedgehog's cross-entropy between the softmax and the student's
            attention weights, added to the output MSE (0: MSE only, as LoLCATs). Forms the
            n × m weights: for training lengths only.
        schedule, warmup: the learning rate over the budget (see ``lr_factor``): progress is
            the larger of steps done / ``steps`` and seconds spent / ``seconds`` (per layer
            with ``layerwise``); ``"constant"`` with no warm-up is plain AdamW at ``lr``.
    """

    steps: int = 200
    seconds: float | None = None
    lr: float = 1e-2
    layerwise: bool = False
    weights_loss: float = 0.0
    schedule: Schedule = "constant"
    warmup: float = 0.0

    def __post_init__(self) -> None:
        _check_budget(self.steps, self.seconds, self.lr)
        _check_schedule(self.schedule, self.warmup)
        if not isinstance(self.layerwise, bool):
            raise TypeError(f"layerwise: expected a bool, got {self.layerwise!r}")
        if not isinstance(self.weights_loss, (int, float)) or self.weights_loss < 0:
            raise ValueError(f"weights_loss: expected a number >= 0, got {self.weights_loss!r}")


@dataclass(frozen=True)
class Finetune:
    """Stage 2: fine-tune chosen weights against the original model's final hidden states.

    Attributes:
        steps, seconds, lr: as ``AttentionTransfer`` (AdamW, no weight decay).
        trainable: which parameters: None (every converted attention module's: for HF models
            the module holding q/k/v, e.g. BERT's ``attention.self``, plus the student's own),
            fnmatch patterns on parameter names (``"*attention*"``), or a predicate
            ``(name, parameter) -> bool``.
        schedule, warmup: as ``AttentionTransfer``.
        pooled_cosine: weight of a term on the mean-pooled embedding added to the hidden-state
            MSE, ``pooled_cosine · mean_b(1 − cos(pool(h_converted), pool(h_original)))``,
            pool = the mean over real tokens (what sentence embedders such as all-MiniLM
            report); 0: the MSE only.
    """

    steps: int = 100
    seconds: float | None = None
    lr: float = 1e-4
    trainable: Trainable = None
    schedule: Schedule = "constant"
    warmup: float = 0.0
    pooled_cosine: float = 0.0

    def __post_init__(self) -> None:
        _check_budget(self.steps, self.seconds, self.lr)
        _check_schedule(self.schedule, self.warmup)
        w = self.pooled_cosine
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"pooled_cosine: expected a number >= 0, got {w!r}")
        t = self.trainable
        ok = (t is None or isinstance(t, str) or callable(t)
              or (isinstance(t, Sequence) and all(isinstance(p, str) for p in t)))
        if not ok:
            raise TypeError(f"trainable: expected None, a pattern, a list of patterns or a "
                            f"predicate (name, parameter) -> bool, got {t!r}")
