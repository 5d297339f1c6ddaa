"""DeBERTa disentangled attention: content→position and position→content logit terms.

    Ã_ij = Q^c_i·K^c_j + Q^c_i·K^r_δ(i,j) + K^c_j·Q^r_δ(i,j),   logits Ã / √(d·(1 + #terms))
    Q^c = H W_q, K^c = H W_k (the attention's own),  K^r = P W_{k,r}, Q^r = P W_{q,r}
    δ(i, j) = clamp(bucket(pos_i − pos_j) + k, 0, 2k − 1),  P ∈ R^(2k × d_model) learned

He, Liu, Gao & Chen 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
arXiv 2006.03654, eqs. 2-4 and the 1/√(3d) scale (1/√(2d) with one position term, 1/√d with
none). v1: bucket = identity, k = ``max_relative_positions``. v2/v3 (as in Hugging Face's
``deberta_v2`` and the authors' code): log buckets (``position_buckets`` = k,
``max_relative_positions``), ``share_att_key`` (P projected by the layer's own content query
and key projections, biases included, instead of separate W_{q,r}, W_{k,r}), ``pos_att_type``
⊂ {"c2p", "p2c"}, an optional LayerNorm on P (HF's ``norm_rel_ebd="layer_norm"``). The p2c
term is indexed as in that code (see ``transformer_zoo.functional.deberta``).

Exact: equal to HF's ``DisentangledSelfAttention`` with the same weights to fp32 rounding
(``tests/test_deberta.py``), for every option combination HF supports, and defined where HF's
is not (p2c with n ≠ m; any int64 positions).

The table P lives in ``DebertaRelativeEmbeddings`` (``deberta_embeddings.py``); pass one
instance to every layer's ``DebertaRelativeBias`` to share it across layers as HF's encoder
does (each layer keeps its own position projections, or reuses its own content projections
with ``share_att_key``).

Shapes: b batch, h heads, n query length, m key length, d head dim, k the span; q ``(b, h, n,
d)``, k ``(b, h, m, d)``; positions int64 ``(n,)``/``(b, n)`` and ``(m,)``/``(b, m)``; bias
``(b, h, n, m)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int, check_probability, check_rank
from transformer_zoo.functional.deberta import disentangled_bias, disentangled_bias_rows
from transformer_zoo.functional.deberta_band import deberta_band_rows
from transformer_zoo.functional.flex import ScoreMod, position_at
from transformer_zoo.positional.base import (
    BandRows,
    FarField,
    FarSide,
    LogitBias,
    saturation_radius,
)
from transformer_zoo.positional.deberta_embeddings import DebertaRelativeEmbeddings

if TYPE_CHECKING:
    from transformer_zoo.attention.multihead import MultiHeadAttention

_TERMS = ("c2p", "p2c")


class DebertaRelativeBias(LogitBias):
    """DeBERTa's c2p and p2c terms as a logit bias, with the 1/√(d·(1 + #terms)) scale.

    Args:
        d_model: model width (of the table and of the attention's input).
        n_heads: heads h of the attention it serves.
        head_dim: per-head width d (default d_model // n_heads).
        embeddings: a shared ``DebertaRelativeEmbeddings`` (one per model, as in HF); None
            builds one from ``max_relative_positions``, ``position_buckets``, ``layer_norm``
            (then 512, −1, False unless given; give them only without ``embeddings``).
        share_att_key: project P with the attention's own q/k projections (v2/v3) instead of
            this module's ``pos_query_proj`` / ``pos_key_proj``. Ties the bias to the one
            attention it is built into: give each layer its own instance.
        pos_att_type: the position terms, a subset of ("c2p", "p2c"); () leaves plain
            attention (scale 1/√d).
        dropout: dropout on P in training (HF's ``pos_dropout``, ``hidden_dropout_prob``).

    Example:
        >>> import torch
        >>> from transformer_zoo import DebertaRelativeBias, SoftmaxAttention
        >>> bias = DebertaRelativeBias(d_model=32, n_heads=4, position_buckets=8,
        ...                            max_relative_positions=16, share_att_key=True)
        >>> SoftmaxAttention(32, 4, positional=bias)(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    needs_keys = True  # the p2c term reads the keys

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        embeddings: DebertaRelativeEmbeddings | None = None,
        max_relative_positions: int | None = None,
        position_buckets: int | None = None,
        layer_norm: bool | None = None,
        share_att_key: bool = False,
        pos_att_type: Sequence[str] = _TERMS,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}: "
                                 "pass head_dim")
            head_dim = d_model // n_heads
        self.head_dim = check_positive_int(head_dim, "head_dim")
        table_options = dict(max_relative_positions=max_relative_positions,
                             position_buckets=position_buckets, layer_norm=layer_norm)
        given = {k: v for k, v in table_options.items() if v is not None}
        if embeddings is None:
            embeddings = DebertaRelativeEmbeddings(d_model=d_model, **given)  # type: ignore[arg-type]
        elif not isinstance(embeddings, DebertaRelativeEmbeddings):
            raise TypeError(f"embeddings: expected a DebertaRelativeEmbeddings, got "
                            f"{type(embeddings).__name__}")
        elif given:
            raise ValueError(f"{sorted(given)}: options of the table; with embeddings= they "
                             "come from it (give them to DebertaRelativeEmbeddings)")
        elif embeddings.d_model != d_model:
            raise ValueError(f"embeddings: expected width d_model={d_model}, got a table of "
                             f"width {embeddings.d_model}")
        self.embeddings = embeddings
        if isinstance(pos_att_type, str) or not all(isinstance(t, str) for t in pos_att_type):
            raise TypeError(f"pos_att_type: expected a sequence of 'c2p'/'p2c' strings such as "
                            f"('c2p', 'p2c'), got {pos_att_type!r}")
        unknown = [t for t in pos_att_type if t not in _TERMS]
        if unknown or len(set(pos_att_type)) != len(pos_att_type):
            raise ValueError(f"pos_att_type: expected distinct terms from {_TERMS}, got "
                             f"{tuple(pos_att_type)!r}")
        self.pos_att_type = tuple(t for t in _TERMS if t in pos_att_type)
        self.share_att_key = bool(share_att_key)
        self.dropout = check_probability(dropout, "dropout")
        inner = n_heads * self.head_dim
        if not self.share_att_key:
            if "c2p" in self.pos_att_type:
                self.pos_key_proj = nn.Linear(d_model, inner)  # W_{k,r}
            if "p2c" in self.pos_att_type:
                self.pos_query_proj = nn.Linear(d_model, inner)  # W_{q,r}
        # (q_proj, kv_proj) of the attention, for share_att_key; a plain tuple, so they stay
        # registered (and saved) only under the attention itself.
        self._content: tuple[nn.Linear, nn.Linear] | None = None

    def check_attention(self, *, n_heads: int, causal: bool) -> None:
        if n_heads != self.n_heads:
            raise ValueError(f"DebertaRelativeBias(n_heads={self.n_heads}) cannot serve an "
                             f"attention with n_heads={n_heads}: expected equal head counts")

    def attach(self, attention: MultiHeadAttention) -> None:
        if attention.head_dim != self.head_dim:
            raise ValueError(f"DebertaRelativeBias(head_dim={self.head_dim}) cannot serve an "
                             f"attention with head_dim={attention.head_dim}")
        if not self.share_att_key:
            return
        if attention.d_model != self.d_model or attention.kv_dim != self.d_model:
            raise ValueError(
                f"share_att_key projects the (2k, {self.d_model}) table with the attention's "
                f"q and k projections: expected d_model = kv_dim = {self.d_model}, got "
                f"d_model={attention.d_model}, kv_dim={attention.kv_dim}")
        if self._content is not None and self._content[0] is not attention.q_proj:
            raise ValueError(
                "DebertaRelativeBias(share_att_key=True) reuses the projections of the one "
                "attention it was built into; give each layer its own instance (share the "
                "table instead: EncoderConfig(positional=lambda: DebertaRelativeBias(..., "
                "embeddings=table)))")
        self._content = (attention.q_proj, attention.kv_proj)

    def logit_scale(self, head_dim: int) -> float:
        return (head_dim * (1 + len(self.pos_att_type))) ** -0.5

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], self.n_heads, self.head_dim).transpose(0, 1)  # (h, 2k, d)

    def position_projections(self, table: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(K^r, Q^r), each ``(h, 2k, d)`` or None when its term is off."""
        pos_key = pos_query = None
        if self.share_att_key:
            if self._content is None:
                raise ValueError("DebertaRelativeBias(share_att_key=True) uses the attention's "
                                 "projections: build the attention with it first")
            q_proj, kv_proj = self._content
            inner = self.n_heads * self.head_dim
            if "c2p" in self.pos_att_type:
                bias = None if kv_proj.bias is None else kv_proj.bias[:inner]
                pos_key = self._heads(F.linear(table, kv_proj.weight[:inner], bias))
            if "p2c" in self.pos_att_type:
                pos_query = self._heads(q_proj(table))
        else:
            if "c2p" in self.pos_att_type:
                pos_key = self._heads(self.pos_key_proj(table))
            if "p2c" in self.pos_att_type:
                pos_query = self._heads(self.pos_query_proj(table))
        return pos_key, pos_query

    def _table(self) -> Tensor:
        """P for one call: normalised if so built, dropped out in training (one draw)."""
        table = self.embeddings()
        if self.dropout > 0 and self.training:
            table = F.dropout(table, p=self.dropout)
        return table

    def _check_q(self, q: Tensor) -> None:
        check_rank(q, "q", 4, "(batch, heads, seq, head_dim)")
        if q.shape[1] != self.n_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"q: expected (batch, {self.n_heads}, seq, {self.head_dim}), got "
                             f"{tuple(q.shape)}")

    def forward(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                k: Tensor | None = None) -> Tensor:
        self._check_q(q)
        pos_key, pos_query = self.position_projections(self._table())
        index = self.embeddings.index(q_positions, k_positions)
        return disentangled_bias(q, k, index, pos_key=pos_key, pos_query=pos_query,
                                 scale=self.logit_scale(self.head_dim))

    def bias_rows(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                  k: Tensor | None = None) -> Callable[[int, int], Tensor]:
        """Rows of ``forward``'s bias for the blockwise kernel, with the per-call work done
        once (``functional.disentangled_bias_rows``): P (one dropout draw for every block),
        its projections K^r, Q^r and the ``(b, h, 2k, m)`` p2c table Q^r·kᵀ. Per block: the
        block's c2p rows q_I·K^rᵀ, its rows δ(i, j) (from the lookup table over the clamped
        distance when there is one, else the buckets of the block's distances) and a gather
        of each. The kernel's recomputing backward re-runs only the per-block part."""
        self._check_q(q)
        self.embeddings.index(q_positions[..., :1], k_positions[..., :1])  # position checks
        pos_key, pos_query = self.position_projections(self._table())
        n, m = q.shape[2], k_positions.shape[-1]
        lookup = self.embeddings.index_table(q.device)
        if lookup is not None and 2 * lookup[1] + 1 <= n * m:
            table_rows, limit = lookup

            def index_rows(i0: int, i1: int) -> Tensor:
                delta = q_positions[..., i0:i1, None] - k_positions[..., None, :]
                return table_rows[delta.clamp(-limit, limit) + limit]
        else:

            def index_rows(i0: int, i1: int) -> Tensor:
                return self.embeddings.index(q_positions[..., i0:i1], k_positions)

        return disentangled_bias_rows(q, k, index_rows, pos_key=pos_key, pos_query=pos_query,
                                      scale=self.logit_scale(self.head_dim))

    def far_radius(self) -> int | None:
        """Past the saturation distance (``deberta_saturation_distance``) each side uses one
        table row. None without a lookup table, or with dropout on P in training (one draw
        per call; the band's blocks would each draw their own)."""
        lookup = self.embeddings.index_table()
        if lookup is None or (self.dropout > 0 and self.training):
            return None
        rows, limit = lookup  # rows[δ + L], δ = pos_i − pos_j
        return saturation_radius(torch.arange(-limit, limit + 1), rows.flip(0))

    def far_field(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                  k: Tensor | None = None) -> FarField:
        """c2p gives a row term s·q_i·K^r_edge, p2c a key term s·Q^r_edge·k_j per side."""
        self._check_q(q)
        lookup = self.embeddings.index_table(q.device)
        if lookup is None or ("p2c" in self.pos_att_type and k is None):
            raise ValueError("DebertaRelativeBias.far_field: needs a lookup table (far_radius "
                             "not None) and, for p2c, the keys k")
        rows = lookup[0]
        pos_key, pos_query = self.position_projections(self._table())
        scale = self.logit_scale(self.head_dim)

        def side(row: int) -> FarSide:
            # (q·r).sum, not q @ r: a matmul would keep a contiguous copy of q (of k)
            c2p = None if pos_key is None else (
                q * pos_key[:, row, None].to(q.dtype)).sum(-1) * scale  # (b, h, n)
            p2c = None if pos_query is None or k is None else (
                k * pos_query[:, row, None].to(k.dtype)).sum(-1) * scale  # (b, h, m)
            return FarSide(row=c2p, key=p2c)

        # left (key before the query): δ > 0, the last row; right: the first
        return FarField(side(int(rows[-1])), side(int(rows[0])))

    def band_rows(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                  k: Tensor | None = None) -> BandRows:
        """The band kernel's bias rows with the per-call work once: P, its projections K^r,
        Q^r (scaled) are the call's tables; per sub-block (rows I, keys J) the c2p rows
        q_I·K^rᵀ, the p2c columns Q^r·k_Jᵀ, the rows δ from the lookup table, a gather each."""
        lookup = self.embeddings.index_table(q.device)
        if lookup is None:
            return super().band_rows(q, q_positions, k_positions, k=k)
        self._check_q(q)
        scale = self.logit_scale(self.head_dim)
        pos_key, pos_query = self.position_projections(self._table())
        tables = tuple(t.to(q.dtype) * scale for t in (pos_key, pos_query) if t is not None)
        return BandRows(tables, deberta_band_rows(*lookup, has_key=pos_key is not None))

    def score_mod(self, q: Tensor, k: Tensor, q_positions: Tensor,
                  k_positions: Tensor) -> ScoreMod | None:
        """FlexAttention score_mod: score + s·(c2p[b, h, i, row] + p2c[b, h, row, j]), with the
        ``(b, h, n, 2k)`` c2p and ``(b, h, 2k, m)`` p2c tables captured (the gradient reaches
        P and the projections through them) and row = a lookup table over the clamped distance
        (the same rows as ``forward``, on every backend). None when the lookup table would be
        too large (the blockwise kernel serves those settings)."""
        lookup = self.embeddings.index_table(q.device)
        if lookup is None:
            return None
        rows, limit = lookup
        pos_key, pos_query = self.position_projections(self._table())
        c2p = None if pos_key is None else torch.matmul(q, pos_key.to(q.dtype).mT)
        p2c = None if pos_query is None else torch.matmul(pos_query.to(k.dtype), k.mT)
        scale = self.logit_scale(self.head_dim)

        def deberta(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            delta = position_at(q_positions, b, q_idx) - position_at(k_positions, b, kv_idx)
            row = rows[delta.clamp(-limit, limit) + limit]
            if c2p is not None and p2c is not None:
                return score + (c2p[b, h, q_idx, row] + p2c[b, h, row, kv_idx]) * scale
            if c2p is not None:
                return score + c2p[b, h, q_idx, row] * scale
            if p2c is not None:
                return score + p2c[b, h, row, kv_idx] * scale
            return score

        return deberta

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"pos_att_type={self.pos_att_type}, share_att_key={self.share_att_key}")
