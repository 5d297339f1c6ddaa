"""ALiBi: attention with linear biases, a fixed per-head logit bias.

    symmetric (bidirectional):  B_h(i, j) = −m_h·|i − j|
    causal:                     B_h(i, j) = −m_h·(i − j)   (keys j > i are masked)
    m_h = 2^(−8h/H) for H a power of 2 (8 heads: 2^−1 … 2^−8), interleaved extension otherwise

Press, Smith & Lewis 2022, "Train Short, Test Long: Attention with Linear Biases Enables
Input Length Extrapolation", arXiv 2108.12409. Exact; no parameters. The distance uses the
given positions (offsets, packed sequences). The paper's code adds m_h·j per key, which
equals the causal form only after softmax under a causal mask; we build −m_h·(i − j), which
keeps the values near the diagonal small (precise in bf16).

Shapes: b batch, h heads, n query length, m key length. positions int64 ``(n,)``/``(b, n)``
and ``(m,)``/``(b, m)``; bias fp32 ``(1|b, h, n, m)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int, check_rank
from transformer_zoo.functional.flex import ScoreMod, position_at
from transformer_zoo.functional.relative import alibi_bias, alibi_slopes
from transformer_zoo.positional.base import FarField, FarSide, LogitBias


class ALiBi(LogitBias):
    """Linear distance penalty per head.

    Args:
        n_heads: number of heads h (slopes from ``alibi_slopes``).
        causal: the causal form −m_h·(i − j), for causal attention; otherwise the symmetric
            −m_h·|i − j|. Both agree on every key j <= i.

    The slopes are a non-persistent fp32 buffer: moved by ``.to(device)``, not saved, kept
    in fp32 by ``.half()`` / ``.to(dtype)`` (2^−0.5 and friends are not exact in fp16), and
    recomputed after ``to_empty`` (meta-device construction) or ``reset_parameters``.

    Example:
        >>> import torch
        >>> from transformer_zoo import ALiBi, SoftmaxAttention
        >>> attn = SoftmaxAttention(32, 4, causal=True, positional=ALiBi(n_heads=4, causal=True))
        >>> attn(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, *, n_heads: int, causal: bool = False) -> None:
        super().__init__()
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.causal = bool(causal)
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self.slopes = alibi_slopes(self.n_heads).to(self.slopes.device)  # exact, fp32
        return self

    def reset_parameters(self) -> None:
        """Recompute the slopes (e.g. after meta-device construction and ``to_empty``)."""
        with torch.no_grad():
            self.slopes.copy_(alibi_slopes(self.n_heads))

    def check_attention(self, *, n_heads: int, causal: bool) -> None:
        if n_heads != self.n_heads:
            raise ValueError(
                f"ALiBi(n_heads={self.n_heads}) cannot serve an attention with "
                f"n_heads={n_heads}: expected equal head counts (one slope per head)"
            )
        if self.causal and not causal:
            raise ValueError(
                "ALiBi(causal=True) gives every future key j > i the growing bonus "
                "m_h·(j − i); it is only correct under a causal mask: build the attention with "
                "causal=True, or use ALiBi(causal=False) (the symmetric −m_h·|i − j|)"
            )

    def forward(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        check_rank(q, "q", 4, "(batch, heads, seq, head_dim)")
        if q.shape[1] != self.n_heads:
            raise ValueError(
                f"q: expected n_heads={self.n_heads} heads, got shape {tuple(q.shape)}"
            )
        return alibi_bias(self.slopes, q_positions, k_positions, causal=self.causal)

    def far_radius(self) -> int:
        return 1

    def far_field(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                  k: Tensor | None = None) -> FarField:
        """Linear in the distance: left of the query −m_h·pos_i + m_h·pos_j, right the same
        (causal form) or its negation (symmetric), past radius 1. In fp64 (the band kernel takes
        differences of these terms; fp32 products of large positions would round)."""
        slopes = self.slopes.to(device=q.device, dtype=torch.float64)[None, :, None]
        qp = q_positions.to(torch.float64)
        kp = k_positions.to(torch.float64)
        left = FarSide(row=-slopes * qp, key=slopes * kp)
        right = left if self.causal else FarSide(row=slopes * qp, key=-slopes * kp)
        return FarField(left, right)

    def score_mod(self, q: Tensor, k: Tensor, q_positions: Tensor,
                  k_positions: Tensor) -> ScoreMod:
        """FlexAttention score_mod: score + m_h·(j − i) (causal) or − m_h·|j − i|, fp32."""
        slopes, causal = self.slopes.to(q.device), self.causal

        def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            r = (position_at(k_positions, b, kv_idx)
                 - position_at(q_positions, b, q_idx)).to(torch.float32)  # j − i
            return score + slopes[h] * (r if causal else -r.abs())

        return alibi

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, causal={self.causal}"
