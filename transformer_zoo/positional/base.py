"""Where a positional encoding acts: the composition contract.

A positional encoding acts in exactly one of three places (``Place``):

- ``Place.INPUT``: a vector added to the token embeddings before the first layer
  (sinusoidal, learned absolute). Subclass ``InputEncoding``.
- ``Place.QK``: a position-dependent transform of queries and keys inside every attention
  (rotary). Subclass ``QKTransform``.
- ``Place.BIAS``: an additive term on the attention logits (Shaw, T5, ALiBi), optionally with
  a value term (Shaw). Subclass ``LogitBias``.

Attention classes declare the places they accept (``MultiHeadAttention.accepts``); the
encoder checks every attention × encoding pair when it is built (``transformer_zoo.compat``).

Shapes: b batch, h heads, n query length, m key length, d head dim, positions int64
``(n,)`` or ``(b, n)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from transformer_zoo._scripting import refuse_scripting

if TYPE_CHECKING:
    from transformer_zoo.attention.multihead import MultiHeadAttention


class Place(enum.Enum):
    """The three places a positional encoding can act."""

    INPUT = "input"  # added to x before the first layer
    QK = "qk"  # transforms q and k inside attention
    BIAS = "bias"  # additive logit bias (and optional value term)


class PositionalEncoding(nn.Module):
    """Base of every positional encoding; ``place`` says where it acts."""

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    place: ClassVar[Place]

    def check_attention(self, *, n_heads: int, causal: bool) -> None:
        """Raise ValueError when this encoding cannot serve an attention module with these
        settings (called by ``MultiHeadAttention`` at construction). Default: any."""

    def attach(self, attention: MultiHeadAttention) -> None:
        """Called by ``MultiHeadAttention.__init__`` once its projections exist (after
        ``check_attention``). Default: nothing. An encoding that reuses the attention's own
        projections (DeBERTa's ``share_att_key``) keeps references to them here; it may raise
        ValueError when it cannot serve this attention."""


class InputEncoding(PositionalEncoding):
    """Absolute encoding added to the input: ``forward(positions) -> (..., n, d_model)``."""

    place = Place.INPUT

    def forward(self, positions: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class QKTransform(PositionalEncoding):
    """Transform of q and k: ``forward(q, k, q_positions, k_positions) -> (q, k)``.

    q ``(b, h, n, d)``, k ``(b, h_kv, m, d)``; positions ``(n,)``/``(b, n)`` and
    ``(m,)``/``(b, m)``.
    """

    place = Place.QK

    def forward(
        self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class FarSide:
    """The bias of the key pairs on one side of the band (``FarField``), as separable terms:
    bias_ij = ``row``_i + ``key``_j, and (a value term) ``value`` added to v_j. Each term is
    None (zero) or a tensor: ``row`` broadcastable to ``(b, h, n)``, ``key`` to ``(b, h, m)``,
    ``value`` to ``(b, h, 1, d_v)``; with the graph to the encoding's parameters, q and k."""

    row: Tensor | None = None
    key: Tensor | None = None
    value: Tensor | None = None


@dataclass
class FarField:
    """Past the encoding's ``far_radius`` R the bias is separable: for every pair with
    pos_j − pos_i <= −R the bias equals ``left``'s terms (``left.row``_i + ``left.key``_j,
    value term Σ_j α_ij ``left.value``), for pos_j − pos_i >= R ``right``'s. (T5 and DeBERTa
    buckets saturate, Shaw's clipping ends, ALiBi is linear.) The band kernel
    (``functional.softmax_banded``) serves those keys with the fused kernel and the terms
    as an extra head-dim column or a log-sum-exp shift, and only the band |pos_j − pos_i| < R
    with the bias itself."""

    left: FarSide
    right: FarSide


@dataclass
class BandRows:
    """An encoding's bias on sub-blocks of rows and keys, for one call of the band kernel:
    ``rows(tables, q_blk, k_blk, q_positions_blk, k_positions_blk)`` -> the bias
    ``(b|1, h, rows, keys)`` of those pairs, equal to ``forward`` on them. ``tables``: the
    per-call work every block shares (DeBERTa's projected position tables), built once with
    its graph; the kernel passes detached copies and pulls their gradients back once."""

    tables: tuple[Tensor, ...]
    rows: Callable[..., Tensor]


def saturation_radius(distance: Tensor, value: Tensor) -> int:
    """The smallest R >= 1 with ``value`` constant over distance <= −R and over >= R (value:
    e.g. the bucket of each distance, 1-D over a span that reaches the saturation)."""
    radius = 1
    for side, edge in ((distance < 0, value[0]), (distance > 0, value[-1])):
        differs = side & (value != edge)
        if bool(differs.any()):
            radius = max(radius, int(distance[differs].abs().max()) + 1)
    return radius


class LogitBias(PositionalEncoding):
    """Additive logit bias ``forward(q, q_positions, k_positions) -> (b|1, h, n, m)``.

    ``q`` ``(b, h, n, d)`` is passed so content-dependent terms (Shaw's qᵀa^K) can use it; the
    returned bias is added to the already scaled logits. Encodings whose terms read the keys
    too (Transformer-XL's global content bias uᵀk_j, DeBERTa's position→content term) set
    ``needs_keys = True`` and receive ``k=`` ``(b, h, m, d)`` as a keyword; others are called
    without it. Encodings with a value term set ``has_value_term = True`` and implement
    ``value_term(weights, q_positions, k_positions)`` returning ``(b, h, n, d)`` to add to the
    attention output.

    Row blocks: row i of the bias depends only on q_i, q_positions_i and the keys, so calling
    ``forward`` on a block of query rows (and their positions) gives exactly those rows of the
    full bias — the exact blockwise kernels rely on this.

    ``logit_scale(head_dim)`` is the factor on the content logits qᵀk (1/√d unless the
    encoding's paper says otherwise, e.g. DeBERTa's 1/√(3d)).
    """

    place = Place.BIAS
    has_value_term: ClassVar[bool] = False
    #: True: ``forward`` also takes the keys as ``k=`` ``(b, h, m, d)``.
    needs_keys: ClassVar[bool] = False

    def forward(
        self, q: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logit_scale(self, head_dim: int) -> float:
        """The factor on the content logits qᵀk that this encoding's bias is added to."""
        return head_dim ** -0.5

    def value_term(
        self, weights: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no value term")

    def bias_rows(
        self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *, k: Tensor | None = None
    ) -> Callable[[int, int], Tensor]:
        """For one attention call, ``rows(i0, i1)`` -> rows i0:i1 of ``forward``'s bias (the
        blockwise kernels call it once per block of query rows). Default: ``forward`` on
        those rows and their positions (the row-block property). Encodings whose bias has
        per-call work that every row shares (Transformer-XL's W_R R table) override it to
        do that work once. ``k`` as for ``forward`` (given when ``needs_keys``)."""

        def rows(i0: int, i1: int) -> Tensor:
            args = (q[:, :, i0:i1], q_positions[..., i0:i1], k_positions)
            return self(*args, k=k) if self.needs_keys else self(*args)

        return rows

    def far_radius(self) -> int | None:
        """The distance R >= 1 past which the bias is separable (``far_field``), or None
        when it never is (the blockwise kernel then builds every bias row). Default: None;
        also for a subclass that redefines ``forward`` or ``value_term`` but not this (its
        parent's far field would no longer describe its bias)."""
        return None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if ("forward" in vars(cls) or "value_term" in vars(cls)) and (
                "far_radius" not in vars(cls)):
            cls.far_radius = LogitBias.far_radius  # type: ignore[method-assign]

    def far_field(
        self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *, k: Tensor | None = None
    ) -> FarField:
        """This bias past ``far_radius`` as separable terms (``FarField``), for these q
        ``(b, h, n, d)`` (k ``(b, h, m, d)`` when ``needs_keys``) and 1-D positions. Its
        terms must equal ``forward`` on every far pair. The band's bias comes from
        ``forward`` on sub-blocks of rows and keys (row i, key j of the bias depend only on
        q_i, k_j and their positions)."""
        raise NotImplementedError(f"{type(self).__name__} has no far field")

    def band_rows(
        self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *, k: Tensor | None = None
    ) -> BandRows:
        """``BandRows`` for one band-kernel call. Default: no tables, ``forward`` on the
        sub-block (row i, key j of the bias depend only on q_i, k_j and their positions)."""

        def rows(tables, q_blk, k_blk, qp_blk, kp_blk):  # type: ignore[no-untyped-def]
            return (self(q_blk, qp_blk, kp_blk, k=k_blk) if self.needs_keys
                    else self(q_blk, qp_blk, kp_blk))

        return BandRows((), rows)

    def score_mod(
        self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor] | None:
        """This bias as a FlexAttention ``score_mod`` ``(score, b, h, q_idx, kv_idx) ->
        score + bias`` for these q ``(b, h, n, d)``, k ``(b, h, m, d)`` and positions, or None
        when the encoding has none (``SoftmaxAttention`` then uses the exact blockwise kernel).
        Its value at every (b, h, i, j) must equal ``forward``'s. Default: None."""
        return None
