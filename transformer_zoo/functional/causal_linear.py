"""Causal linear attention as a chunked prefix sum with a running stabilizer, O(n(F+Q)) memory.

    Y_r = Σ_{s ≤ r} (a_r · b_s) · exp(g_s − g_r) · x_s          (g non-decreasing in s)

Katharopoulos et al. 2020 ("Transformers are RNNs", arXiv 2006.16236) write causal linear
attention as the recurrence S_r = S_(r−1) + b_r x_rᵀ, Y_r = a_rᵀ S_r; Choromanski et al. 2021
(arXiv 2009.14794, section 2.6) use it for causal FAVOR+. The extra factor exp(g_s − g_r)
carries a *running* key stabilizer: FAVOR+ key features are stored as exp(log φ(k_s) − g_s)
with g_s = max of the log-features over keys ≤ s, and the pair (r, s) is re-referenced to
g_r. Every factor is ≤ 1 and no key after r ever enters output r (a global key max would let
one large future key underflow all past outputs).

Shapes: ``(..., n, P)`` a and b, ``(..., n, Q)`` x, ``(..., n)`` g; output ``(..., n, Q)``.
``...`` is (batch, heads). Exact (no approximation): equal to the quadratic form
``((a bᵀ) ⊙ exp(g_s − g_r) ⊙ [s ≤ r]) x`` up to rounding.

Memory: chunks of ``chunk`` rows; the forward holds one P × Q state per chunk and the C × C
blocks of 1024 rows at a time (O(n(P + Q + PQ/C)), linear in n); the autograd Function saves
only its inputs (O(n(P+Q))) and recomputes in backward (a forward scan for ∂a, reverse scans
for ∂b and ∂x), never an n × P × Q tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

_GROUP_ROWS = 1024  # rows whose C × C blocks are formed at once


def chunked_scan(
    a: Tensor, b: Tensor, x: Tensor, g: Tensor, *, chunk: int = 128, reverse: bool = False
) -> Tensor:
    """The prefix sum above (no autograd). ``reverse=True`` sums the suffix instead:

        Y_r = Σ_{s ≥ r} (a_r · b_s) · exp(g_r − g_s) · x_s        (g non-decreasing)

    Chunkwise-parallel form: the chunks' C × C blocks (1024 rows' worth at a time) and their
    P × Q summaries are batched matmuls; only the carry of the P × Q state from chunk to chunk
    is a loop (two small ops per chunk). Memory O(1024·C + n·(P + Q + P·Q/C)).
    """
    *lead, n, p = a.shape
    q = x.shape[-1]
    c = min(chunk, n)
    blocks = -(-n // c)
    pad = blocks * c - n
    if pad:  # zero rows at the end contribute nothing; their outputs are dropped
        a, b, x = (torch.cat([t, t.new_zeros(*lead, pad, t.shape[-1])], -2) for t in (a, b, x))
        g = torch.cat([g, g[..., -1:].expand(*lead, pad)], -1)
    a_, b_ = a.reshape(*lead, blocks, c, p), b.reshape(*lead, blocks, c, p)
    x_, g_ = x.reshape(*lead, blocks, c, q), g.reshape(*lead, blocks, c)
    # each chunk's summary Σ_s e^{±(g_s − g_edge)} b_s x_sᵀ, referenced at its first (reverse:
    # the chunk's min of g) or last (forward: the max) row, so every factor is <= 1
    edge = g_[..., :1] if reverse else g_[..., -1:]  # (..., N, 1)
    weight = ((edge - g_) if reverse else (g_ - edge)).exp().unsqueeze(-1)
    if p <= q:  # scale the narrower side (a copy of n × min(P, Q), not n × max)
        states = torch.matmul((b_ * weight).transpose(-2, -1), x_)  # (..., N, P, Q)
    else:
        states = torch.matmul(b_.transpose(-2, -1), x_ * weight)
    # in place: chunk i's summary becomes the state entering chunk i (exclusive running sum),
    # referenced at its neighbour's edge; re-referencing factors are <= 1
    carry: Tensor | None = None
    prev = 0
    for i in range(blocks - 1, -1, -1) if reverse else range(blocks):
        own = states[..., i, :, :].clone()
        if carry is None:
            states[..., i, :, :].zero_()
            carry = own
        else:
            states[..., i, :, :].copy_(carry)
            shift = (edge[..., i, :] - edge[..., prev, :]) * (1.0 if reverse else -1.0)
            carry = carry * shift.exp().unsqueeze(-1) + own
        prev = i
    if reverse:
        ref = torch.cat([edge[..., 1:, :], g_[..., -1:, -1:]], -2)  # >= g in the chunk
        factor = (g_ - ref).exp()
    else:
        ref = torch.cat([g_[..., :1, :1], edge[..., :-1, :]], -2)  # <= g in the chunk
        factor = (ref - g_).exp()
    y = torch.matmul(a_, states).mul_(factor.unsqueeze(-1))  # (..., N, C, Q): from the others
    del states
    # within each chunk: the masked C × C block, 1024 rows' worth at a time
    keep = torch.ones(c, c, dtype=torch.bool, device=a.device)
    keep = keep.triu() if reverse else keep.tril()  # [r, s]: s >= r, or s <= r
    group = max(1, _GROUP_ROWS // c)
    for start in range(0, blocks, group):
        sl = slice(start, start + group)
        gs = g_[..., sl, :]
        diff = gs.unsqueeze(-1) - gs.unsqueeze(-2)  # [r, s] = g_r − g_s
        decay = (diff if reverse else diff.neg_()).masked_fill_(~keep, float("-inf")).exp_()
        scores = torch.matmul(a_[..., sl, :, :], b_[..., sl, :, :].transpose(-2, -1))
        y[..., sl, :, :] += torch.matmul(scores.mul_(decay), x_[..., sl, :, :])
    return y.reshape(*lead, blocks * c, q)[..., :n, :]


class _CausalScan(torch.autograd.Function):
    """Autograd for ``chunked_scan``: saves the inputs, recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, x: Tensor, g: Tensor, chunk: int) -> Tensor:
        ctx.save_for_backward(a, b, x, g)
        ctx.chunk = chunk
        return chunked_scan(a, b, x, g, chunk=chunk)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b, x, g = ctx.saved_tensors
        grad = grad.contiguous()
        need_a, need_b, need_x = ctx.needs_input_grad[:3]
        # ∂a_r = Σ_{s≤r} (grad_r · x_s) e^{g_s − g_r} b_s;  ∂b_s = Σ_{r≥s} (x_s · grad_r) e^{..} a_r
        # ∂x_s = Σ_{r≥s} (b_s · a_r) e^{g_s − g_r} grad_r   (g is a stabilizer: no gradient)
        ga = chunked_scan(grad, x, b, g, chunk=ctx.chunk) if need_a else None
        gb = chunked_scan(x, grad, a, g, chunk=ctx.chunk, reverse=True) if need_b else None
        gx = chunked_scan(b, a, grad, g, chunk=ctx.chunk, reverse=True) if need_x else None
        return ga, gb, gx, None, None


def causal_linear_scan(a: Tensor, b: Tensor, x: Tensor, g: Tensor, *, chunk: int = 128) -> Tensor:
    """``Y_r = Σ_{s≤r} (a_r·b_s) exp(g_s − g_r) x_s`` with O(n(P+Q)) memory in fwd and bwd.

    a, b ``(..., n, P)``; x ``(..., n, Q)``; g ``(..., n)`` non-decreasing along n (treated as
    a constant: callers use it as a stabilizer whose value cancels). Returns ``(..., n, Q)``.
    """
    if chunk <= 0:
        raise ValueError(f"chunk: expected a positive int, got {chunk}")
    return _CausalScan.apply(a, b, x, g.detach(), int(chunk))
