"""DeBERTa's relative position table P ``(2k, d_model)`` and its row index δ(i, j).

    δ(i, j) = clamp(bucket(pos_i − pos_j) + k, 0, 2k − 1),  P ∈ R^(2k × d_model) learned

He, Liu, Gao & Chen 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
arXiv 2006.03654; v1 clips (bucket = identity), v2/v3 use log buckets (Hugging Face's
``deberta_v2``, ``transformer_zoo.functional.deberta``). One instance can serve every layer's
``DebertaRelativeBias`` (``positional/deberta.py``), as HF's encoder shares ``rel_embeddings``.
Exact. Shapes: positions int64 ``(n,)``/``(b, n)`` and ``(m,)``/``(b, m)``; rows ``(n, m)``
or ``(b, n, m)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int
from transformer_zoo._scripting import refuse_scripting
from transformer_zoo.functional.deberta import (
    check_deberta_buckets,
    deberta_position_index,
    deberta_relative_positions,
    deberta_saturation_distance,
)


class DebertaRelativeEmbeddings(nn.Module):
    """The relative position table P ``(2k, d_model)`` (HF's ``encoder.rel_embeddings``).

    Args:
        d_model: width of the table (the model width, HF's ``hidden_size``).
        max_relative_positions: v1's clipping distance k, or the log buckets' range (HF's
            ``max_relative_positions``; its −1 means ``max_position_embeddings``, 512).
        position_buckets: −1: no log buckets (v1, k = max_relative_positions); a positive
            value: v2/v3 log buckets, k = position_buckets (256 in DeBERTa-v3).
        layer_norm: LayerNorm on P before use (HF's ``norm_rel_ebd="layer_norm"``, v3).
        layer_norm_eps: its epsilon (HF's ``layer_norm_eps``, 1e-7).
        init_std: std of the normal initialisation of P.

    ``forward()`` returns P (normalised if ``layer_norm``); ``index(q_positions,
    k_positions)`` the rows δ(i, j) ``(n, m)`` or ``(b, n, m)``.
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(
        self,
        *,
        d_model: int,
        max_relative_positions: int = 512,
        position_buckets: int = -1,
        layer_norm: bool = False,
        layer_norm_eps: float = 1e-7,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.att_span = check_deberta_buckets(position_buckets, max_relative_positions)
        self.max_relative_positions = max_relative_positions
        self.position_buckets = position_buckets
        self.init_std = float(init_std)
        self.weight = nn.Parameter(torch.empty(2 * self.att_span, d_model))  # P
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self) -> Tensor:
        return self.weight if self.norm is None else self.norm(self.weight)

    def index(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """Table rows clamp(bucket(pos_i − pos_j) + k, 0, 2k − 1), int64."""
        delta = deberta_relative_positions(
            q_positions, k_positions, position_buckets=self.position_buckets,
            max_relative_positions=self.max_relative_positions,
        )
        return deberta_position_index(delta, self.att_span)

    def index_table(self, device: torch.device | None = None) -> tuple[Tensor, int] | None:
        """(rows, L): ``rows[δ + L]`` is the table row of δ ∈ [−L, L] and of every δ beyond
        once clamped to it (``deberta_saturation_distance``); None when L is too large."""
        limit = deberta_saturation_distance(self.position_buckets, self.max_relative_positions)
        if limit is None:
            return None
        span = torch.arange(-limit, limit + 1, device=device)
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        return self.index(zero, span)[0].flip(0), limit  # δ = 0 − key position = −span

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, max_relative_positions={self.max_relative_positions}, "
            f"position_buckets={self.position_buckets}, att_span={self.att_span}"
        )
