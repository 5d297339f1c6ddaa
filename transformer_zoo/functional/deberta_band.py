"""DeBERTa's disentangled bias on the band kernel's sub-blocks (pure functions).

    bias_IJ = s·q_I·K^r_δ(I,J) + s·Q^r_δ(I,J)·k_J     (c2p, p2c; δ from the lookup table)

He, Liu, Gao & Chen 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
arXiv 2006.03654, eqs. 2-4; the indexing is ``functional.deberta``'s (HF ``deberta_v2``'s).
The band kernel (``functional/softmax_banded.py``) evaluates the bias only on rows I × keys J
of one band sub-block; the projected tables K^r, Q^r (scaled by s) are the call's per-call
work, passed in as ``tabs`` (``BandRows``). Exact: equal to ``disentangled_bias`` on the
sub-block, to rounding.

Shapes: b batch, h heads, rows / keys of the sub-block, d head dim, 2k table rows.
q_blk ``(b, h, rows, d)``, k_blk ``(b, h, keys, d)``, tables ``(h, 2k, d)``; positions int64
``(rows,)`` and ``(keys,)``; bias ``(b, h, rows, keys)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from transformer_zoo.functional.deberta import gather_terms


def deberta_band_rows(table_rows: Tensor, limit: int, *, has_key: bool
                      ) -> Callable[..., Tensor]:
    """``rows(tabs, q_blk, k_blk, qp_blk, kp_blk)`` -> the sub-block's bias, for
    ``BandRows``: ``table_rows[δ + limit]`` the lookup table over the clamped distance δ =
    pos_i − pos_j; ``tabs`` = (s·K^r, s·Q^r), either one alone as the terms are configured
    (``has_key``: s·K^r is present, first)."""

    def rows(tabs, q_blk, k_blk, qp_blk, kp_blk):  # type: ignore[no-untyped-def]
        index = table_rows[(qp_blk[:, None] - kp_blk[None, :]).clamp(-limit, limit) + limit]
        key_s = tabs[0] if has_key else None
        query_s = tabs[-1] if len(tabs) == 2 or not has_key and tabs else None
        c2p = None if key_s is None else torch.matmul(q_blk, key_s.transpose(-1, -2))
        b, h, r = q_blk.shape[:3]
        bias = gather_terms(c2p, None, index, b, h)
        if query_s is not None:
            p2c = p2c_term(query_s, k_blk, index)
            bias = p2c if bias is None else bias + p2c
        return q_blk.new_zeros(()).expand(b, h, r, index.shape[-1]) if bias is None else bias

    return rows


#: Keys per piece of the band's p2c columns (``p2c_term``).
P2C_KEYS = 128


def p2c_term(query_s: Tensor, k_blk: Tensor, index: Tensor) -> Tensor:
    """The p2c term Q^r[index_ij]·k_j ``(b, h, rows, keys)`` of a band sub-block (``index``
    ``(rows, keys)``), by pieces of ``P2C_KEYS`` keys: each multiplies only the table rows
    min … max of its index (a band's rows read a window of the 2k rows per key, as wide as
    the block near the diagonal, a few log buckets far from it), then gathers."""
    b, keys = k_blk.shape[0], k_blk.shape[2]
    pieces = []
    for j0 in range(0, keys, P2C_KEYS):
        j1 = min(j0 + P2C_KEYS, keys)
        piece = index[:, j0:j1]
        lo, hi = int(piece.min()), int(piece.max()) + 1
        cols = torch.matmul(query_s[:, lo:hi], k_blk[:, :, j0:j1].transpose(-1, -2))
        pieces.append(gather_terms(None, cols, piece - lo, b, query_s.shape[0]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
