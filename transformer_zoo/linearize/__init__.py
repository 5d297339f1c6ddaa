"""Linearize a pretrained model: attention transfer (stage 1) and fine-tuning (stage 2).

``linearize(model, attention, batches)`` swaps ``attention`` (Performer, Nyström, learnable
feature maps) into every softmax layer and trains it to match the model's own softmax
attention; see ``transfer.py`` for the losses and ``report.py`` for the errors it reports.
"""

from transformer_zoo.linearize.report import LinearizeReport, StageReport
from transformer_zoo.linearize.stages import AttentionTransfer, Finetune
from transformer_zoo.linearize.teacher_student import Conversion, Tap, convert, new_parameters
from transformer_zoo.linearize.transfer import linearize

__all__ = ["AttentionTransfer", "Conversion", "Finetune", "LinearizeReport", "StageReport",
           "Tap", "convert", "linearize", "new_parameters"]
