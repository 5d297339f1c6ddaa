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

Memory: chunks of ``chunk`` rows; the forward holds the C × C block of every chunk and one
P × Q state per chunk (O(n(C + PQ/C)), linear in n); the autograd Function saves only its
inputs (O(n(P+Q))) and recomputes in backward (a forward scan for ∂a, reverse scans for ∂b
and ∂x), never an n × P × Q tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunked_scan(
    a: Tensor, b: Tensor, x: Tensor, g: Tensor, *, chunk: int = 128, reverse: bool = False
) -> Tensor:
    """The prefix sum above (no autograd). ``reverse=True`` sums the suffix instead:

        Y_r = Σ_{s ≥ r} (a_r · b_s) · exp(g_r − g_s) · x_s        (g non-decreasing)

    Chunkwise-parallel form: every chunk's C × C block and its P × Q summary are batched
    matmuls over all chunks at once; only the carry of the P × Q state from chunk to chunk is
    a loop (two small ops per chunk). Memory O(n·(C + P·Q/C)) for chunk size C.
    """
    if reverse:  # time reversal maps the suffix sum onto the prefix sum (g -> −g, flipped)
        flip = [t.flip(-2) for t in (a, b, x)]
        return chunked_scan(*flip, -g.flip(-1), chunk=chunk).flip(-2)
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
    keep = torch.ones(c, c, dtype=torch.bool, device=a.device).tril()  # [r, s]: s <= r
    decay = (g_.unsqueeze(-2) - g_.unsqueeze(-1)).masked_fill_(~keep, float("-inf")).exp_()
    y = torch.matmul(torch.matmul(a_, b_.transpose(-2, -1)).mul_(decay), x_)  # (.., N, C, Q)
    g_end = g_[..., -1:]  # (..., N, 1): each chunk's max of g
    summary = torch.matmul(b_.transpose(-2, -1), x_ * (g_ - g_end).exp().unsqueeze(-1))
    states = torch.zeros_like(summary)  # state entering chunk i, referenced at g_end[i − 1]
    for i in range(1, blocks):
        carried = states[..., i - 1, :, :]
        if i > 1:
            carried = carried * (g_end[..., i - 2, :] - g_end[..., i - 1, :]).exp().unsqueeze(-1)
        states[..., i, :, :] = carried + summary[..., i - 1, :, :]
    g_ref = torch.cat([g_[..., :1, :1], g_end[..., :-1, :]], -2)  # (..., N, 1); <= g in chunk
    y += torch.matmul(a_, states) * (g_ref - g_).exp().unsqueeze(-1)  # factors <= 1
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
