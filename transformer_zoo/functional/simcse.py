"""Unsupervised SimCSE loss: InfoNCE over in-batch pairs of two dropout views.

    ℓ_i = −log [ exp(sim(h_i, h_i⁺)/τ) / Σ_{j=1..b} exp(sim(h_i, h_j⁺)/τ) ],   sim = cosine

Gao, Yao and Chen 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
arXiv 2104.08821 (section 3); τ = 0.05. h_i and h_i⁺ are the same sentence encoded twice
with independent dropout masks; the other sentences of the batch are the negatives. The loss is the
cross-entropy of the b×b similarity matrix against labels arange(b), averaged over the batch.
``symmetric=True`` also scores each h_i⁺ against all h_j and averages the two directions (the
CLIP form); the paper uses the one-directional loss.

Shapes: z1, z2 ``(b, d)`` -> scalar. Exact; computed in at least fp32 (fp16/bf16 inputs are
upcast). Cosine uses ``F.normalize`` (eps 1e-8), so a zero vector has similarity 0, not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import check_floating, check_rank, check_same_dtype


def simcse_logits(z1: Tensor, z2: Tensor, *, temperature: float = 0.05) -> Tensor:
    """``(b, d), (b, d) -> (b, b)``: cos(z1_i, z2_j) / τ, in at least fp32."""
    for name, z in (("z1", z1), ("z2", z2)):
        check_rank(z, name, 2, "(batch, dim)")
        check_floating(z, name)
    check_same_dtype("z1", z1, "z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape (batch, dim), "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature: expected a float > 0, got {temperature}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    u1 = F.normalize(z1.to(dtype), dim=-1, eps=1e-8)  # (b, d)
    u2 = F.normalize(z2.to(dtype), dim=-1, eps=1e-8)
    return u1 @ u2.mT / temperature  # (b, b)


def simcse_loss(
    z1: Tensor, z2: Tensor, *, temperature: float = 0.05, symmetric: bool = False
) -> Tensor:
    """InfoNCE of view 1 against view 2 (and back, if ``symmetric``); mean over the batch."""
    logits = simcse_logits(z1, z2, temperature=temperature)  # (b, b)
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.mT, labels))
    return loss
