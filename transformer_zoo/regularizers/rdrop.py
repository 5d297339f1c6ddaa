"""R-Drop loss: task loss on both dropout passes plus α times their consistency term.

    L = ℓ(P1, y) + ℓ(P2, y) + α · ½ [KL(P1 ‖ P2) + KL(P2 ‖ P1)]

Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", arXiv 2106.14448,
section 2 (ℓ = negative log-likelihood there). For regression heads the KL term is replaced by
the squared error between the two predictions.

α used by the paper's official scripts: machine translation 5, abstractive summarization 0.7,
language modelling 1.0, GLUE fine-tuning about 1 (tuned per task), ViT image classification
0.3. The README snippet of the official code averages the two task losses,
½[ℓ(P1, y) + ℓ(P2, y)]; that equals this loss with α doubled, up to an overall factor ½.

Shapes: predictions ``(b, ..., c)`` logits (``"kl"``) or ``(b, ...)`` values (``"mse"``);
``target`` is whatever ``task_loss`` takes; ``mask`` (kl/mse term only) broadcastable to the
positions ``(b, ...)``, **True = real token**. Exact given the two passes; get them with
:func:`transformer_zoo.regularizers.two_pass_forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from transformer_zoo._scripting import refuse_scripting
from transformer_zoo.functional.rdrop import Reduction, rdrop_mse, symmetric_kl

_CONSISTENCY = ("kl", "mse")
_SCALAR_REDUCTIONS = ("sum", "mean", "batchmean")


class RDropLoss(nn.Module):
    """``task_loss(pred_p, y) + task_loss(pred_q, y) + alpha · consistency(pred_p, pred_q)``.

    Args:
        alpha: weight α ≥ 0 of the consistency term (see the module docstring per task).
        task_loss: called as ``task_loss(pred, target)``, e.g. ``nn.CrossEntropyLoss()``
            (for token logits ``(b, n, c)`` pass a callable that flattens them).
        consistency: ``"kl"`` (symmetric KL of the softmax of logits) or ``"mse"``
            (squared error, for regression heads).
        reduction: how the consistency term reduces over real positions
            (``"mean"`` matches the default mean of ``nn.CrossEntropyLoss``).
    """

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    def __init__(
        self,
        alpha: float,
        task_loss: Callable[[Tensor, Tensor], Tensor],
        *,
        consistency: Literal["kl", "mse"] = "kl",
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
        if not alpha >= 0.0:
            raise ValueError(f"alpha: expected a float >= 0, got {alpha}")
        if not callable(task_loss):
            raise TypeError(f"task_loss: expected a callable, got {type(task_loss).__name__}")
        if consistency not in _CONSISTENCY:
            raise ValueError(f"consistency: expected one of {_CONSISTENCY}, got {consistency!r}")
        if reduction not in _SCALAR_REDUCTIONS:
            raise ValueError(f"reduction: expected one of {_SCALAR_REDUCTIONS}, got {reduction!r}")
        self.alpha = float(alpha)
        self.task_loss = task_loss
        self.consistency = consistency
        self.reduction = reduction
        self._term = symmetric_kl if consistency == "kl" else rdrop_mse

    def forward(
        self, pred_p: Tensor, pred_q: Tensor, target: Tensor, *, mask: Tensor | None = None
    ) -> Tensor:
        """Total loss (scalar) from the two passes' predictions and the targets."""
        task = self.task_loss(pred_p, target) + self.task_loss(pred_q, target)
        term = self._term(pred_p, pred_q, mask=mask, reduction=self.reduction)
        return task + self.alpha * term

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, consistency={self.consistency}, reduction={self.reduction}"
