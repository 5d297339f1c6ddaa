"""The attention variants the ListOps job trains, and the R-Drop loss it uses.

Variants are objects built from classes, never strings: each holds an attention factory (a
class or a ``functools.partial`` of one) and an R-Drop weight.

R-Drop (Liang et al. 2021, arXiv 2106.14448): two dropout passes p1, p2 of the same batch,

    L = CE(p1, y) + CE(p2, y) + α · ½ [KL(p1‖p2) + KL(p2‖p1)]

is ``transformer_zoo.RDropLoss(α, nn.CrossEntropyLoss())``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from transformer_zoo import NystromAttention, PerformerAttention, RDropLoss, SoftmaxAttention
from transformer_zoo.encoder.encoder import AttentionFactory


@dataclass(frozen=True)
class Variant:
    """One training run: a display name, an attention factory and the R-Drop weight (0 = off)."""

    name: str
    attention: AttentionFactory
    rdrop_alpha: float = 0.0


def attention_factories(*, full: bool = False) -> list[tuple[str, AttentionFactory]]:
    """Softmax, Performer and Nyström.

    Budgets: CPU-sized by default (64 features, 16 landmarks); ``full`` uses LRA's (256
    features, 64 landmarks).
    """
    features, landmarks = (256, 64) if full else (64, 16)
    return [
        ("softmax", SoftmaxAttention),
        (f"performer-{features}", partial(PerformerAttention, nb_features=features)),
        (f"nystrom-{landmarks}", partial(NystromAttention, num_landmarks=landmarks)),
    ]


def build_variants(*, full: bool = False, rdrop_alpha: float = 1.0) -> list[Variant]:
    """Every attention, without and then with R-Drop."""
    variants = []
    for name, factory in attention_factories(full=full):
        variants.append(Variant(name, factory))
        variants.append(Variant(f"{name}+rdrop", factory, rdrop_alpha=rdrop_alpha))
    return variants


def rdrop_loss(alpha: float) -> RDropLoss:
    """The job's R-Drop objective for classification logits ``(b, classes)``."""
    return RDropLoss(alpha, nn.CrossEntropyLoss())
