"""DeBERTa's relative positions and disentangled attention bias (pure functions).

    Ã_ij = Q^c_i·K^c_j + Q^c_i·K^r_δ(i,j) + K^c_j·Q^r_δ(i,j),   scaled by 1/√(d·(1 + #terms))
    δ(i, j) = clamp(bucket(i − j) + k, 0, 2k − 1)

He, Liu, Gao & Chen 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
arXiv 2006.03654, eqs. 2-4 (content→position "c2p", position→content "p2c"). ``bucket`` is
the identity in v1 (k = max_relative_positions: the paper's clipped distance, 2k entries) and
the log buckets of v2/v3 (``deberta_log_bucket``, k = position_buckets).

The p2c term is indexed as in the authors' code and Hugging Face's ``deberta_v2``:
``gather(K^c Q^rᵀ, clamp(−bucket(j − i) + k))ᵀ``, i.e. Q^r at clamp(bucket(i − j) + k) for
query i, key j (the bucket is odd: bucket(−r) = −bucket(r)). The paper writes δ(j, i) there.

Positions, not indices: δ uses the given int64 positions (query position − key position), so
offsets and packed sequences work; with ``arange`` positions this is HF's
``build_relative_position``.

Shapes: b batch, h heads, n query length, m key length, d head dim, k the span (table of 2k
rows). q ``(b, h, n, d)``, k ``(b, h, m, d)``, position keys/queries ``(h, 2k, d)``,
positions ``(n,)``/``(b, n)`` and ``(m,)``/``(b, m)``; bias ``(b, h, n, m)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int, check_rank, check_tensor
from transformer_zoo.functional.relative import relative_positions


def check_deberta_buckets(position_buckets: int, max_relative_positions: int) -> int:
    """Validate the options; return the span k (rows of the table: 2k).

    ``position_buckets`` −1 disables the log buckets (v1), a positive value enables them (v2/v3)
    and then needs ``max_relative_positions − 1 > position_buckets // 2`` (the log's range).
    """
    check_positive_int(max_relative_positions, "max_relative_positions")
    if isinstance(position_buckets, bool) or not isinstance(position_buckets, int) or (
        position_buckets != -1 and position_buckets < 1
    ):
        raise ValueError(
            f"position_buckets: expected -1 (no log buckets, DeBERTa v1) or a positive int "
            f"(v2/v3), got {position_buckets!r}"
        )
    if position_buckets == -1:
        return max_relative_positions
    mid = position_buckets // 2
    if position_buckets < 2 or max_relative_positions - 1 <= mid:
        raise ValueError(
            f"position_buckets={position_buckets}, max_relative_positions="
            f"{max_relative_positions}: log buckets need position_buckets >= 2 and "
            f"max_relative_positions - 1 > position_buckets // 2 = {mid} (else the log "
            "ratio log((max_relative_positions - 1) / mid) is <= 0)"
        )
    return position_buckets


def deberta_log_bucket(
    relative_position: Tensor, *, position_buckets: int, max_relative_positions: int
) -> Tensor:
    """DeBERTa v2/v3 log bucket of a relative position r, int64.

    With mid = position_buckets // 2: |r| <= mid is exact (r); otherwise
    sign(r)·(⌈log(|r|/mid) / log((max_relative_positions − 1)/mid) · (mid − 1)⌉ + mid), so
    |r| = max_relative_positions − 1 lands on 2·mid − 1. Odd in r. Bit-equal to HF's
    ``make_log_bucket_position`` (same fp32 log, same order of operations); the authors'
    NumPy original takes the log in fp64, which differs only for distances whose bucket lies
    outside the table (both are clamped to its last row).
    """
    check_tensor(relative_position, "relative_position")
    check_deberta_buckets(position_buckets, max_relative_positions)
    r = relative_position.long()
    mid = position_buckets // 2
    sign = torch.sign(r)
    abs_pos = torch.where((r < mid) & (r > -mid), torch.full_like(r, mid - 1), r.abs())
    ratio = torch.log(torch.tensor((max_relative_positions - 1) / mid, dtype=torch.float32,
                                   device=r.device))
    log_pos = torch.ceil(torch.log(abs_pos.float() / mid) / ratio * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, r.float(), log_pos * sign).long()


def deberta_relative_positions(
    q_positions: Tensor,
    k_positions: Tensor,
    *,
    position_buckets: int = -1,
    max_relative_positions: int = 512,
) -> Tensor:
    """DeBERTa's relative position pos_i − pos_j (query minus key, the opposite sign of
    ``relative_positions``), log-bucketed when ``position_buckets > 0``; int64 ``(n, m)`` or
    ``(b, n, m)``. With ``arange`` positions this equals HF's ``build_relative_position``."""
    delta = -relative_positions(q_positions, k_positions)
    check_deberta_buckets(position_buckets, max_relative_positions)
    if position_buckets > 0:
        delta = deberta_log_bucket(delta, position_buckets=position_buckets,
                                   max_relative_positions=max_relative_positions)
    return delta


def deberta_position_index(relative_position: Tensor, att_span: int) -> Tensor:
    """Row of the relative table: clamp(δ + k, 0, 2k − 1) (paper's δ(i, j), eq. 3)."""
    check_positive_int(att_span, "att_span")
    return (relative_position + att_span).clamp(0, 2 * att_span - 1)


def deberta_saturation_distance(position_buckets: int, max_relative_positions: int) -> int | None:
    """A distance L past which the table row no longer changes: every δ >= L has row 2k − 1
    (or the constant row of ``position_buckets`` < 4), every δ <= −L row 0. So a lookup table
    over δ ∈ [−L, L], indexed at clamp(δ, −L, L), gives every row. v1: L = k. Log buckets:
    the bucket reaches k at |r| = mid·((R − 1)/mid)^((k − mid)/(mid − 1)) (+2 for rounding);
    None when that exceeds 2^22 (no lookup table)."""
    span = check_deberta_buckets(position_buckets, max_relative_positions)
    if position_buckets == -1:
        return span
    mid = position_buckets // 2
    if mid < 2:  # bucket(r) = sign(r)·mid for every |r| > mid
        return mid + 1
    ratio = math.log(float(torch.tensor((max_relative_positions - 1) / mid,
                                        dtype=torch.float32)))
    exponent = ratio * (span - mid) / (mid - 1)
    if exponent > math.log(2.0**22 / mid):
        return None
    return math.ceil(mid * math.exp(exponent)) + 2


def _check_tables(q: Tensor, pos_key: Tensor | None, pos_query: Tensor | None) -> None:
    h = q.shape[1]
    for name, table in (("pos_key", pos_key), ("pos_query", pos_query)):
        if table is not None and (table.ndim != 3 or table.shape[0] != h
                                  or table.shape[-1] != q.shape[-1]):
            raise ValueError(f"{name}: expected (heads, 2k, head_dim) = ({h}, 2k, "
                             f"{q.shape[-1]}), got {tuple(table.shape)}")
    if pos_key is not None and pos_query is not None and pos_key.shape != pos_query.shape:
        raise ValueError(f"pos_key {tuple(pos_key.shape)} and pos_query "
                         f"{tuple(pos_query.shape)}: expected the same (heads, 2k, head_dim)")


def _check_keys(k: Tensor | None, m: int, caller: str) -> Tensor:
    if k is None:
        raise ValueError(f"{caller}: the p2c term needs the keys k (b, h, m, d)")
    check_rank(k, "k", 4, "(batch, heads, k_len, head_dim)")
    if k.shape[-2] != m:
        raise ValueError(f"k: expected k_len={m} keys (index), got {tuple(k.shape)}")
    return k


def disentangled_bias(
    q: Tensor,
    k: Tensor | None,
    index: Tensor,
    *,
    pos_key: Tensor | None,
    pos_query: Tensor | None,
    scale: float,
) -> Tensor:
    """c2p + p2c logit terms ``(b, h, n, m)``, already multiplied by ``scale``.

    c2p(i, j) = q_i·K^r[index_ij] (``pos_key`` K^r ``(h, 2k, d)``, None = no c2p term);
    p2c(i, j) = k_j·Q^r[index_ij] (``pos_query`` Q^r ``(h, 2k, d)``, None = no p2c term; then
    ``k`` ``(b, h, m, d)`` is needed). ``index`` ``(n, m)`` or ``(b, n, m)`` is
    ``deberta_position_index`` of the bucketed relative positions. Row i depends only on q_i
    and index_i, so a block of query rows gives exactly those rows. Exact; one
    ``(b, h, n, 2k)`` and one ``(b, h, 2k, m)`` score table, gathered once each.
    """
    check_rank(q, "q", 4, "(batch, heads, q_len, head_dim)")
    b, h, n, _ = q.shape
    m = index.shape[-1]
    if index.ndim not in (2, 3) or index.shape[-2] != n:
        raise ValueError(
            f"index: expected (q_len, k_len) or (batch, q_len, k_len) with q_len={n}, got "
            f"{tuple(index.shape)}"
        )
    _check_tables(q, pos_key, pos_query)
    idx = (index[None] if index.ndim == 2 else index)[:, None].expand(b, h, n, m)
    bias: Tensor | None = None
    if pos_key is not None:
        c2p = torch.matmul(q, pos_key.to(q.dtype).transpose(-1, -2))  # (b, h, n, 2k)
        bias = c2p.gather(-1, idx)
    if pos_query is not None:
        k = _check_keys(k, m, "disentangled_bias")
        p2c = torch.matmul(pos_query.to(k.dtype), k.transpose(-1, -2))  # (b, h, 2k, m)
        p2c = p2c.gather(-2, idx)  # Q^r[index_ij]·k_j
        bias = p2c if bias is None else bias + p2c
    if bias is None:  # no term: a zero bias, broadcast (no (b, h, n, m) storage)
        return q.new_zeros(()).expand(b, h, n, m)
    return bias * scale


def disentangled_bias_rows(
    q: Tensor,
    k: Tensor | None,
    index_rows: Callable[[int, int], Tensor],
    *,
    pos_key: Tensor | None,
    pos_query: Tensor | None,
    scale: float,
) -> Callable[[int, int], Tensor]:
    """``disentangled_bias`` one block of query rows at a time: ``rows(i0, i1)`` -> rows
    i0:i1 of the bias ``(b, h, i1 − i0, m)`` (equal to them to rounding), given
    ``index_rows(i0, i1)`` -> rows i0:i1 of ``index`` (``(rows, m)`` or ``(b, rows, m)``).

    The per-call work is done here, once: the ``(b, h, 2k, m)`` p2c table Q^r·kᵀ (2k·m·d per
    head, the part every block shares), scaled (as K^r). Per block: the block's c2p rows
    q_I·K^rᵀ ``(b, h, rows, 2k)`` (each row's own work, as in ``disentangled_bias``; a full
    ``(b, h, n, 2k)`` table would cost a full-size gradient buffer per block in the backward)
    and one gather of each table (a flat ``index_select`` when the batch shares one index).
    Nothing ``(b, h, n, m)`` is built; the gradient reaches ``pos_key``, ``pos_query``, q and
    k through each block's gathers (the tables are inputs of a recomputing block, not
    recomputed).
    """
    check_rank(q, "q", 4, "(batch, heads, q_len, head_dim)")
    b, h, n, _ = q.shape
    _check_tables(q, pos_key, pos_query)
    p2c: Tensor | None = None
    if pos_query is not None:
        if k is None:
            raise ValueError("disentangled_bias_rows: the p2c term needs the keys k (b, h, m, d)")
        check_rank(k, "k", 4, "(batch, heads, k_len, head_dim)")
        p2c = torch.matmul(pos_query.to(k.dtype), k.transpose(-1, -2)) * scale  # (b, h, 2k, m)
    key_t = None if pos_key is None else (pos_key.to(q.dtype) * scale).transpose(-1, -2)

    def rows(i0: int, i1: int) -> Tensor:
        index = index_rows(i0, i1)
        m = index.shape[-1]
        if index.ndim not in (2, 3) or index.shape[-2] != i1 - i0:
            raise ValueError(f"index_rows({i0}, {i1}): expected ({i1 - i0}, k_len) or (batch, "
                             f"{i1 - i0}, k_len), got {tuple(index.shape)}")
        if p2c is not None and p2c.shape[-1] != m:
            raise ValueError(f"k: expected k_len={m} keys (index), got {tuple(k.shape)}")
        c2p = None if key_t is None else torch.matmul(q[:, :, i0:i1], key_t)  # (b, h, rows, 2k)
        bias = gather_terms(c2p, p2c, index, b, h)
        if bias is None:
            return q.new_zeros(()).expand(b, h, i1 - i0, m)
        return bias  # the scale is in the tables

    return rows


def gather_terms(c2p: Tensor | None, p2c: Tensor | None, index: Tensor, b: int,
                 h: int) -> Tensor | None:
    """c2p[.., i, index_ij] + p2c[.., index_ij, j] ``(b, h, r, c)`` (None without either):
    c2p ``(b, h, r, 2k)``, p2c ``(b, h, 2k, c)``, index ``(r, c)`` or ``(b|1, r, c)`` (a flat
    ``index_select`` when the batch shares one index: faster than gather on CPU)."""
    r, m = index.shape[-2:]
    shared = index.ndim == 2 or index.shape[0] == 1  # one index for the whole batch
    idx = None if shared else index[:, None].expand(b, h, r, m)
    if shared:
        index = index.reshape(r, m)
    bias: Tensor | None = None
    if c2p is not None:
        if idx is None:
            flat = index + torch.arange(r, device=index.device)[:, None] * c2p.shape[-1]
            bias = c2p.reshape(b * h, -1).index_select(1, flat.reshape(-1)).view(b, h, r, m)
        else:
            bias = c2p.gather(-1, idx)  # q_i·K^r[index_ij]
    if p2c is not None:
        if idx is None:
            flat = index * m + torch.arange(m, device=index.device)
            term = p2c.reshape(b * h, -1).index_select(1, flat.reshape(-1)).view(b, h, r, m)
        else:
            term = p2c.gather(-2, idx)  # Q^r[index_ij]·k_j
        bias = term if bias is None else bias + term
    return bias
