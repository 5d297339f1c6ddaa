"""Stage configurations of ``linearize``: ``AttentionTransfer`` (stage 1), ``Finetune`` (stage 2).

Frozen dataclasses, checked when built (ValueError / TypeError naming what was expected).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

Trainable = str | Sequence[str] | Callable[[str, nn.Parameter], bool] | None


def _check_budget(steps: object, seconds: object, lr: object) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or seconds < 0):
        raise ValueError(f"seconds: expected a number >= 0 or None, got {seconds!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr: expected a number > 0, got {lr!r}")


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
    """

    steps: int = 200
    seconds: float | None = None
    lr: float = 1e-2
    layerwise: bool = False
    weights_loss: float = 0.0

    def __post_init__(self) -> None:
        _check_budget(self.steps, self.seconds, self.lr)
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
    """

    steps: int = 100
    seconds: float | None = None
    lr: float = 1e-4
    trainable: Trainable = None

    def __post_init__(self) -> None:
        _check_budget(self.steps, self.seconds, self.lr)
        t = self.trainable
        ok = (t is None or isinstance(t, str) or callable(t)
              or (isinstance(t, Sequence) and all(isinstance(p, str) for p in t)))
        if not ok:
            raise TypeError(f"trainable: expected None, a pattern, a list of patterns or a "
                            f"predicate (name, parameter) -> bool, got {t!r}")
