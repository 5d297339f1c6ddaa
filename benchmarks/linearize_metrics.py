"""Metrics of ``benchmarks.linearize_minilm``: mean-pooled embeddings of the held-out text,
cosine to the original model's, and Spearman's ρ between the two models' pairwise cosines."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed(model, batches: list[dict]) -> torch.Tensor:
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        real = batch["attention_mask"][..., None].to(hidden.dtype)
        out.append((hidden * real).sum(1) / real.sum(1))
    return torch.cat(out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two vectors (ranks' Pearson correlation; ties are negligible here)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pair_cosines(x: torch.Tensor) -> torch.Tensor:
    u = F.normalize(x.double(), dim=-1)
    i, j = torch.triu_indices(len(u), len(u), 1)
    return (u @ u.T)[i, j]


class Scorer:
    """Held-out cosine / Spearman of a converted model against the original embeddings."""

    def __init__(self, original, short: list[dict], long: list[dict]) -> None:
        self.short, self.long = short, long
        self.ref_short, self.ref_long = embed(original, short), embed(original, long)
        self.ref_pairs = pair_cosines(self.ref_short)

    def __call__(self, model) -> dict:
        e_short, e_long = embed(model, self.short), embed(model, self.long)
        cos = torch.cat([F.cosine_similarity(e_short, self.ref_short),
                         F.cosine_similarity(e_long, self.ref_long)])
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                "cosine_long": float(F.cosine_similarity(e_long, self.ref_long).mean()),
                "spearman": spearman(pair_cosines(e_short), self.ref_pairs)}

    def quick(self, model) -> float:
        """The curve's point: mean cosine on the first batch of short passages."""
        got = embed(model, self.short[:1])
        return float(F.cosine_similarity(got, self.ref_short[:len(got)]).mean())
