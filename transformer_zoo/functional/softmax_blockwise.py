"""Exact softmax attention with a logit-bias encoding, one block of query rows at a time.

    O[I] = softmax(Q[I] Kᵀ · s + B[I] + C[I] + log M[I]) V[, + value term of those rows],
    B = positional(Q, q_positions, k_positions[, k=K]),   I = rows i0 … i1 − 1 of one block

The same attention as ``softmax_attention(q, k, v, bias=B + C, mask=M, causal=...)`` (Vaswani
et al. 2017, arXiv 1706.03762) with the bias of a ``LogitBias`` encoding (T5, ALiBi, Shaw, or
any other), but the ``(b, h, n, m)`` bias is never built: row i of B depends only on q_i, its
position and the keys (the ``LogitBias`` row-block contract), so each block of query rows gets
its own bias rows, mask rows, causal rows and rows of C (a float additive mask), and one
softmax over all m keys. The rows come from ``positional.bias_rows`` (per-call work that
all rows share, such as Transformer-XL's W_R R table, done once). Exact: every row sees every
key, in the same arithmetic as the materialised kernel (outputs and gradients equal it to rounding).

Backward (``functional.softmax_blockwise_lse.BlockwiseBiasAttention``): the forward keeps only
the output and the log-sum-exp L of each row; the backward recomputes one block's bias rows
and weights P = exp(S − L) at a time (FlashAttention's backward, Dao et al. 2022, arXiv
2205.14135), so neither the ``(b, h, n, m)`` bias, nor the weights, nor the bias gradient is
ever held; the block's dS is pulled back through its bias rows into the encoding's parameters
(T5's bucket table, Shaw's embeddings, Transformer-XL's u, v, W_R, DeBERTa's table and
projections). The per-call work of the bias (``bias_rows``) is built once per call and kept
(it is small) for the backward. On CPU the forward runs on PyTorch's fused flash kernel with
the block's bias as its float mask (which also returns L), and so does the backward of a
block whose bias needs no gradient (ALiBi). Cost: the content matmuls of one forward and one
backward, plus the bias rows twice. With dropout (or under autocast or ``torch.compile``)
each block instead runs under ``torch.utils.checkpoint`` (``use_reentrant=False``), which
replays the block's forward, dropout masks included, in the backward; with a value term (Shaw)
one dropout mask of the weights serves both the values and the value term, as in the
materialised path. (The masks drawn differ from the materialised kernel's: a different but
equally valid dropout draw.)

Memory: one block's ``(b, h, rows, m)`` tensors at a time; ``block_size`` query rows per block
(default: as many as keep one block's bias at ``BLOCK_ELEMENTS`` elements).

Shapes: b batch, h query heads, h_kv key/value heads (h_kv divides h), n query length, m key
length, d head dim, d_v value head dim. q ``(b, h, n, d)``, k ``(b, h_kv, m, d)``, v ``(b, h_kv,
m, d_v)`` -> ``(b, h, n, d_v)``; positions int64 ``(n,)``/``(b, n)`` and ``(m,)``/``(b, m)``;
``mask`` boolean (True = may attend) and ``bias`` float, each broadcastable to ``(b, h, n, m)``;
``causal``: bottom-right aligned (query i sees key j <= i + m − n). Dead rows (no key left)
give 0, as in ``softmax_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from transformer_zoo._checks import (
    check_bool_mask,
    check_broadcastable,
    check_floating,
    check_positions,
    check_positive_int,
    check_probability,
)
from transformer_zoo.functional.masks import merge_masks
from transformer_zoo.functional.softmax import (
    check_qkv,
    expand_kv_heads,
    explicit_softmax_attention,
    softmax_attention,
)
from transformer_zoo.functional.softmax_banded import banded_softmax_attention
from transformer_zoo.functional.softmax_blockwise_lse import (
    BlockwiseBiasAttention,
    Plan,
    causal_rows,
    prepare_grad,
    row_block,
)
from transformer_zoo.positional.base import LogitBias

#: Default size of one block's bias, in elements (b · h · rows · m): 2^21 fp32 = 8 MiB.
BLOCK_ELEMENTS = 2**21


def block_rows(b: int, h: int, n: int, m: int, block_size: int | None = None) -> int:
    """Query rows per block: ``block_size`` if given, else as many as keep b·h·rows·m at
    ``BLOCK_ELEMENTS`` (at least 16 rows, at most n)."""
    if block_size is not None:
        return min(check_positive_int(block_size, "block_size"), n)
    return max(1, min(n, max(16, BLOCK_ELEMENTS // max(1, b * h * m))))


def blockwise_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positional: LogitBias | None = None,
    q_positions: Tensor | None = None,
    k_positions: Tensor | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Exact softmax attention with ``positional``'s bias, block by block; see the module.

    ``positional``: a ``LogitBias`` (or None: plain attention with ``bias``/``mask``);
    positions default to ``arange(n)`` and ``arange(m)``. ``bias``: an additive float term
    broadcastable to ``(b, h, n, m)`` added to the encoding's (e.g. ``call_bias``).
    ``scale`` defaults to ``positional.logit_scale(d)`` (1/√d without an encoding).
    ``block_size``: query rows per block (default ``block_rows``). Returns ``(b, h, n, d_v)``.
    """
    b, h, n, m, _ = check_qkv(q, k, v)
    if positional is not None and not isinstance(positional, LogitBias):
        raise TypeError(
            f"positional: expected a LogitBias encoding (or None), got "
            f"{type(positional).__name__}"
        )
    dropout_p = check_probability(dropout_p, "dropout_p")
    target = (b, h, n, m)
    if mask is not None:
        check_bool_mask(mask, "mask")
        mask = check_broadcastable(mask, "mask", target, "(b, h, n, m)")
    if bias is not None:
        check_floating(bias, "bias")
        bias = check_broadcastable(bias, "bias", target, "(b, h, n, m)")
    if q_positions is None:
        q_positions = torch.arange(n, device=q.device)
    if k_positions is None:
        k_positions = torch.arange(m, device=q.device)
    check_positions(q_positions, b, n, "q_positions")
    check_positions(k_positions, b, m, "k_positions")
    if scale is None:
        scale = positional.logit_scale(q.shape[-1]) if positional is not None else (
            1.0 / math.sqrt(q.shape[-1]))
    rows = block_rows(b, h, n, m, block_size)
    k, v = expand_kv_heads(k, v, h)  # once, not per block
    value_term = positional is not None and positional.has_value_term

    if dropout_p == 0 and not torch.is_autocast_enabled(q.device.type) and (
            not torch.compiler.is_compiling()):
        if positional is not None and bias is None:  # separable past a band: fused far keys
            out = banded_softmax_attention(q, k, v, positional=positional,
                                           q_positions=q_positions, k_positions=k_positions,
                                           mask=mask, causal=causal, scale=scale,
                                           block_size=block_size)
            if out is not None:
                return out
        plan = Plan(positional, q_positions, k_positions, mask, causal, scale, rows, n, m)
        leaves = prepare_grad(plan, q, k) if torch.is_grad_enabled() else []
        return BlockwiseBiasAttention.apply(plan, q, k, v, bias, *leaves)

    # dropout, autocast or torch.compile (which traces the checkpointed blocks, not the Function
    # and its graph probe): each block checkpointed, its forward replayed in the backward.
    # per-call work of the bias (Transformer-XL's W_R R table) once; rows per block
    bias_rows = None if positional is None else positional.bias_rows(
        q, q_positions, k_positions, k=k if positional.needs_keys else None)

    def block(q_blk: Tensor, qp_blk: Tensor, i0: int, i1: int) -> Tensor:
        total = row_block(bias, i0, i1)
        if bias_rows is not None:
            pe = bias_rows(i0, i1)  # = positional(q_blk, qp_blk, k_positions[, k=k])
            total = pe if total is None else pe + total
        blk_mask = row_block(mask, i0, i1)
        if causal:
            blk_mask = merge_masks(blk_mask, causal_rows(i0, i1, n, m, m, q.device))
        if not value_term:
            return softmax_attention(q_blk, k, v, mask=blk_mask, bias=total,
                                     dropout_p=dropout_p, scale=scale)
        out, weights = explicit_softmax_attention(q_blk, k, v, mask=blk_mask, bias=total,
                                                  scale=scale)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)  # one mask for the values and the term
            out = weights @ v
        return out + positional.value_term(weights, qp_blk, k_positions)  # type: ignore[union-attr]

    outs = []
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        args = (q[:, :, i0:i1], q_positions[..., i0:i1], i0, i1)
        if torch.is_grad_enabled():
            outs.append(checkpoint(block, *args, use_reentrant=False))
        else:
            outs.append(block(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
