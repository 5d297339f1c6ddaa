"""T5 relative position bias: a learned scalar per head and log-spaced distance bucket.

    B_h(i, j) = T[bucket(j − i), h],    T ∈ R^(num_buckets × h) learned

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", arXiv 1910.10683, section 2.1. Buckets are bit-equal to the reference algorithm
(``transformer_zoo.functional.relative.t5_relative_bucket``): exact for small distances,
logarithmic up to ``max_distance``, one bucket beyond. Bidirectional uses half the buckets per
direction; causal maps every key after the query to bucket 0.

T5 shares one table across all layers: pass one instance as the encoder's ``positional`` (a
zero-argument factory gives every layer its own). T5 also leaves out the 1/√d logit scale;
here the bias is added to the scaled logits, which the learned table absorbs.

Shapes: b batch, h heads, n query length, m key length. positions int64 ``(n,)``/``(b, n)``
and ``(m,)``/``(b, m)``; bias ``(1|b, h, n, m)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int, check_rank
from transformer_zoo.functional.flex import ScoreMod, position_at
from transformer_zoo.functional.relative import (
    relative_positions,
    t5_bucket_lookup,
    t5_relative_bucket,
)
from transformer_zoo.positional.base import FarField, FarSide, LogitBias, saturation_radius


class T5RelativeBias(LogitBias):
    """Per-head learned bias over T5's distance buckets.

    Args:
        n_heads: number of heads h.
        num_buckets: buckets in total (32 in T5).
        max_distance: distances at or past it share the last bucket (128 in T5).
        causal: causal bucketing (keys after the query -> bucket 0) instead of bidirectional.
        init_std: std of the normal initialisation of the table.

    Example:
        >>> import torch
        >>> from transformer_zoo import SoftmaxAttention, T5RelativeBias
        >>> attn = SoftmaxAttention(32, 4, positional=T5RelativeBias(n_heads=4))
        >>> attn(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        *,
        n_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        causal: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.num_buckets = check_positive_int(num_buckets, "num_buckets")
        self.max_distance = check_positive_int(max_distance, "max_distance")
        self.causal = bool(causal)
        t5_relative_bucket(  # validates the bucket options now rather than at the first call
            torch.zeros(1, dtype=torch.int64), causal=self.causal, num_buckets=num_buckets,
            max_distance=max_distance,
        )
        self.init_std = float(init_std)
        self.weight = nn.Parameter(torch.empty(num_buckets, n_heads))  # T
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def buckets(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """Bucket ids ``(n, m)`` or ``(b, n, m)``."""
        return t5_bucket_lookup(
            relative_positions(q_positions, k_positions),
            causal=self.causal,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

    def check_attention(self, *, n_heads: int, causal: bool) -> None:
        if n_heads != self.n_heads:
            raise ValueError(
                f"T5RelativeBias(n_heads={self.n_heads}) cannot serve an attention with "
                f"n_heads={n_heads}: expected equal head counts (one table column per head)"
            )
        if self.causal and not causal:
            raise ValueError(
                "T5RelativeBias(causal=True) puts every future key in bucket 0, the query's "
                "own: under bidirectional attention future keys would be indistinguishable "
                "from the present token. Build the attention with causal=True, or use "
                "T5RelativeBias(causal=False) (separate buckets per direction)"
            )

    def forward(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        check_rank(q, "q", 4, "(batch, heads, seq, head_dim)")
        if q.shape[1] != self.n_heads:
            raise ValueError(
                f"q: expected n_heads={self.n_heads} heads, got shape {tuple(q.shape)}"
            )
        # Every distance past max_distance shares the last bucket, so look the table up per
        # clamped distance r ∈ [−D, D] (2D + 1 entries) and gather once per (i, j).
        d = self.max_distance
        r = relative_positions(q_positions, k_positions).clamp_(-d, d).add_(d)  # (.., n, m)
        r = r[None] if r.ndim == 2 else r  # (1|b, n, m)
        per_distance = self.per_distance(r.device)  # (h, 2D + 1)
        bias = per_distance.index_select(1, r.flatten())  # (h, b·n·m)
        return bias.view(self.n_heads, *r.shape).transpose(0, 1)  # (1|b, h, n, m)

    def per_distance(self, device: torch.device) -> Tensor:
        """The table per clamped distance r + D, r ∈ [−D, D]: ``(h, 2D + 1)`` (D =
        max_distance; every distance past D is in the last bucket either way)."""
        d = self.max_distance
        span = torch.arange(-d, d + 1, device=device)
        bucket_of_r = t5_relative_bucket(span, causal=self.causal, num_buckets=self.num_buckets,
                                         max_distance=d)  # (2D + 1,)
        return self.weight.T[:, bucket_of_r]  # (h, 2D + 1), contiguous

    def far_radius(self) -> int:
        """Where the buckets saturate on both sides (<= max_distance; 91 for T5's 32 buckets
        and 128)."""
        d = self.max_distance
        span = torch.arange(-d, d + 1)
        bucket = t5_relative_bucket(span, causal=self.causal, num_buckets=self.num_buckets,
                                    max_distance=d)
        return saturation_radius(span, bucket)

    def far_field(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                  k: Tensor | None = None) -> FarField:
        """Past ``far_radius`` each side's bias is one table entry per head: a row term."""
        table = self.per_distance(q.device).to(q.dtype)  # (h, 2D + 1)
        return FarField(FarSide(row=table[None, :, :1]), FarSide(row=table[None, :, -1:]))

    def score_mod(self, q: Tensor, k: Tensor, q_positions: Tensor,
                  k_positions: Tensor) -> ScoreMod:
        """FlexAttention score_mod: score + T[bucket(j − i), h], looked up per clamped distance
        in a captured ``(h, 2D + 1)`` table (the gradient reaches ``weight`` through it)."""
        table, d = self.per_distance(q.device).to(q.dtype), self.max_distance

        def t5(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            r = position_at(k_positions, b, kv_idx) - position_at(q_positions, b, q_idx)
            return score + table[h, r.clamp(-d, d) + d]

        return t5

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, causal={self.causal}"
        )
