"""The attention variants the ListOps job trains, and the R-Drop loss it uses.

Variants are objects built from classes, never strings: each holds an attention factory (a
class or a ``functools.partial`` of one) and an R-Drop weight. Attentions that are not in the
installed ``transformer_zoo`` yet are left out, so the job runs on any checkout.

R-Drop (Liang et al. 2021, arXiv 2106.14448): two dropout passes p1, p2 of the same batch,

    L = CE(p1, y) + CE(p2, y) + α · ½ [KL(p1‖p2) + KL(p2‖p1)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import transformer_zoo
from transformer_zoo import SoftmaxAttention
from transformer_zoo.encoder.encoder import AttentionFactory

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Variant:
    """One training run: a display name, an attention factory and the R-Drop weight (0 = off)."""

    name: str
    attention: AttentionFactory
    rdrop_alpha: float = 0.0


def attention_factories(*, full: bool = False) -> list[tuple[str, AttentionFactory]]:
    """Softmax always; Performer and Nyström when the installed library has them.

    Budgets: CPU-sized by default; ``full`` uses LRA's (256 features, 64 landmarks).
    """
    out: list[tuple[str, AttentionFactory]] = [("softmax", SoftmaxAttention)]
    performer = getattr(transformer_zoo, "PerformerAttention", None)
    if performer is not None:
        m = 256 if full else 64
        out.append((f"performer-{m}", partial(performer, nb_features=m)))
    nystrom = getattr(transformer_zoo, "NystromAttention", None)
    if nystrom is not None:
        m = 64 if full else 16
        out.append((f"nystrom-{m}", partial(nystrom, num_landmarks=m)))
    return out


def build_variants(*, full: bool = False, rdrop_alpha: float = 1.0) -> list[Variant]:
    """Every available attention, without and then with R-Drop."""
    variants = []
    for name, factory in attention_factories(full=full):
        variants.append(Variant(name, factory))
        variants.append(Variant(f"{name}+rdrop", factory, rdrop_alpha=rdrop_alpha))
    return variants


def symmetric_kl(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """½[KL(p_a‖p_b) + KL(p_b‖p_a)] between softmax(logits) rows, averaged over rows.

    Equal to ½ Σ_c (p_a − p_b)(log p_a − log p_b): non-negative, symmetric, 0 iff p_a = p_b.
    """
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    return 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1).mean()


def local_rdrop_loss(alpha: float) -> LossFn:
    """R-Drop for classification, written here until the library's regularizer lands."""

    def loss(logits_1: Tensor, logits_2: Tensor, labels: Tensor) -> Tensor:
        ce = F.cross_entropy(logits_1, labels) + F.cross_entropy(logits_2, labels)
        return ce + alpha * symmetric_kl(logits_1, logits_2)

    return loss


def rdrop_loss(alpha: float) -> tuple[LossFn, str]:
    """The library's ``RDropLoss`` when present and equal to the formula above, else ours.

    Returns ``(loss_fn, source)`` with ``source`` "transformer_zoo.RDropLoss" or "local".
    TODO: drop the local version once ``transformer_zoo.RDropLoss`` is on main.
    """
    ours = local_rdrop_loss(alpha)
    library = getattr(transformer_zoo, "RDropLoss", None)
    if library is None:
        return ours, "local"
    theirs = library(alpha, nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    got, want = theirs(a, b, y), ours(a, b, y)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        print(
            f"warning: transformer_zoo.RDropLoss gives {float(got):.6f}, the formula "
            f"{float(want):.6f} (a different reduction?); using the local R-Drop loss"
        )
        return ours, "local"
    return theirs, "transformer_zoo.RDropLoss"
