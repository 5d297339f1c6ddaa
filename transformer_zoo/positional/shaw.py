"""Shaw et al. relative position representations: a logit bias plus a value term.

    e_ij = q_i·(k_j + a^K_(r_ij)) / √d,     o_i = Σ_j α_ij (v_j + a^V_(r_ij)),
    r_ij = clip(j − i, −k, k) + k,   a^K, a^V ∈ R^((2k+1) × d) learned

Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with Relative Position Representations",
arXiv 1803.02155, eq. 3-6. The tables are shared across heads, as in the paper. Exact: the
logit term is q_i·a^K_r/√d gathered per (i, j); the value term sums the attention weights per
clipped distance, then multiplies by a^V.

Shapes: b batch, h heads, n query length, m key length, d head dim. q ``(b, h, n, d)``;
positions int64 ``(n,)``/``(b, n)`` and ``(m,)``/``(b, m)``; bias ``(b, h, n, m)``; value term
``(b, h, n, d)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int, check_rank
from transformer_zoo.functional.flex import ScoreMod, position_at
from transformer_zoo.functional.relative import shaw_relative_index
from transformer_zoo.positional.base import FarField, FarSide, LogitBias


class ShawRelativePosition(LogitBias):
    """Learned key and value relative embeddings over clip(j − i, −k, k).

    Args:
        head_dim: per-head width d of q, k, v.
        max_distance: the clipping distance k (the paper uses 16 for translation).
        init_std: std of the normal initialisation of both tables.

    Example:
        >>> import torch
        >>> from transformer_zoo import ShawRelativePosition, SoftmaxAttention
        >>> attn = SoftmaxAttention(32, 4, positional=ShawRelativePosition(head_dim=8))
        >>> attn(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    has_value_term = True

    def __init__(self, *, head_dim: int, max_distance: int = 16, init_std: float = 0.02) -> None:
        super().__init__()
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.max_distance = check_positive_int(max_distance, "max_distance")
        self.init_std = float(init_std)
        self.key_embedding = nn.Parameter(torch.empty(2 * max_distance + 1, head_dim))  # a^K
        self.value_embedding = nn.Parameter(torch.empty(2 * max_distance + 1, head_dim))  # a^V
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_embedding, std=self.init_std)
        nn.init.normal_(self.value_embedding, std=self.init_std)

    def _index(self, shape: tuple[int, int, int, int], q_positions: Tensor,
               k_positions: Tensor) -> Tensor:
        idx = shaw_relative_index(q_positions, k_positions, self.max_distance)  # (.., n, m)
        idx = idx[None] if idx.ndim == 2 else idx
        return idx[:, None].expand(shape)  # (b, h, n, m)

    def forward(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        check_rank(q, "q", 4, "(batch, heads, seq, head_dim)")
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q: expected head_dim={self.head_dim} channels, got shape {tuple(q.shape)}"
            )
        b, h, n, _ = q.shape
        m = k_positions.shape[-1]
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = (q @ self.key_embedding.to(q.dtype).T) * scale  # (b, h, n, 2k+1): q_i·a^K_r/√d
        idx = self._index((b, h, n, m), q_positions, k_positions)
        return scores.gather(-1, idx)  # (b, h, n, m)

    def score_mod(self, q: Tensor, k: Tensor, q_positions: Tensor,
                  k_positions: Tensor) -> ScoreMod:
        """FlexAttention score_mod of the logit term only: score + q_i·a^K_r/√d, gathered from
        a captured ``(b, h, n, 2k+1)`` tensor. The value term needs the weights, which
        FlexAttention does not return: ``SoftmaxAttention`` runs Shaw blockwise."""
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = (q @ self.key_embedding.to(q.dtype).T) * scale  # (b, h, n, 2k+1)
        d = self.max_distance

        def shaw(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            r = position_at(k_positions, b, kv_idx) - position_at(q_positions, b, q_idx)
            return score + scores[b, h, q_idx, r.clamp(-d, d) + d]

        return shaw

    def far_radius(self) -> int:
        return self.max_distance

    def far_field(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                  k: Tensor | None = None) -> FarField:
        """Past the clipping distance k: left q_i·a^K_(−k)/√d and value a^V_(−k), right the
        same at +k."""
        scale = 1.0 / math.sqrt(self.head_dim)
        emb, val = self.key_embedding.to(q.dtype), self.value_embedding.to(q.dtype)
        # (q·a).sum rather than q @ a: a matmul would keep a contiguous copy of q for a's grad
        left = FarSide(row=(q * emb[0]).sum(-1) * scale, value=val[0])
        right = FarSide(row=(q * emb[-1]).sum(-1) * scale, value=val[-1])
        return FarField(left, right)

    def value_term(self, weights: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        check_rank(weights, "weights", 4, "(batch, heads, q_len, k_len)")
        b, h, n, m = weights.shape
        idx = self._index((b, h, n, m), q_positions, k_positions)
        per_distance = weights.new_zeros(b, h, n, 2 * self.max_distance + 1)
        per_distance = per_distance.scatter_add(-1, idx, weights)  # Σ_j α_ij per clipped r
        return per_distance @ self.value_embedding.to(weights.dtype)  # (b, h, n, d)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_distance={self.max_distance}"
