"""The attention variants the ListOps job trains, and the R-Drop loss it uses.

Variants are objects built from classes, never strings: each holds an attention factory (a
class or a ``functools.partial`` of one) and an R-Drop weight.

R-Drop (Liang et al. 2021, arXiv 2106.14448): two dropout passes p1, p2 of the same batch,

    L = CE(p1, y) + CE(p2, y) + α · ½ [KL(p1‖p2) + KL(p2‖p1)]

is ``transformer_zoo.RDropLoss(α, nn.CrossEntropyLoss())``. The job reports its two parts
apart (``rdrop_parts``): the task loss ½[CE(p1, y) + CE(p2, y)], comparable with a run without
R-Drop, and the unweighted KL term; the objective is 2 · task loss + α · KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer_zoo import NystromAttention, PerformerAttention, RDropLoss, SoftmaxAttention
from transformer_zoo.encoder.encoder import AttentionFactory
from transformer_zoo.functional import GeneralizedFeatures, symmetric_kl


@dataclass(frozen=True)
class Variant:
    """One training run: a display name, an attention factory and the R-Drop weight (0 = off)."""

    name: str
    attention: AttentionFactory
    rdrop_alpha: float = 0.0


def attention_factories(*, full: bool = False) -> list[tuple[str, AttentionFactory]]:
    """Softmax, Performer and Nyström.

    Budgets: CPU-sized by default (64 features of FAVOR+, 16 landmarks). ``full``: the
    Nyströmformer paper's LRA runs (``LRA/code/lra_config.py``): performer-256 with its ReLU
    kernel (``kernel_type: relu``: our ``GeneralizedFeatures``, 256 features) and nystrom-64
    with a depthwise convolution of length 35.
    """
    if full:
        return [
            ("softmax", SoftmaxAttention),
            ("performer-relu-256", partial(PerformerAttention, nb_features=256,
                                           feature_map=GeneralizedFeatures())),
            ("nystrom-64", partial(NystromAttention, num_landmarks=64, conv_kernel=35)),
        ]
    return [
        ("softmax", SoftmaxAttention),
        ("performer-64", partial(PerformerAttention, nb_features=64)),
        ("nystrom-16", partial(NystromAttention, num_landmarks=16)),
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


@torch.no_grad()
def rdrop_parts(first: Tensor, second: Tensor, labels: Tensor) -> tuple[float, float]:
    """``(task loss, KL)`` of R-Drop on the two passes' logits ``(b, classes)``: the task loss
    is the mean of the two cross-entropies (what a run without R-Drop reports), the KL is
    ½[KL(p1‖p2) + KL(p2‖p1)], unweighted. ``rdrop_loss(α)`` = 2 · task + α · KL."""
    task = 0.5 * (F.cross_entropy(first, labels) + F.cross_entropy(second, labels))
    return float(task), float(symmetric_kl(first, second))
