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

Memory: chunks of ``chunk`` rows; the forward keeps only a P × Q state and one chunk's
C × C scores; the autograd Function saves its inputs (O(n(P+Q))) and recomputes chunk by
chunk in backward (a forward scan for ∂a, a reverse scan for ∂b and ∂x), never an n × P × Q
tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunked_scan(
    a: Tensor, b: Tensor, x: Tensor, g: Tensor, *, chunk: int = 128, reverse: bool = False
) -> Tensor:
    """The prefix sum above (no autograd). ``reverse=True`` sums the suffix instead:

        Y_r = Σ_{s ≥ r} (a_r · b_s) · exp(g_r − g_s) · x_s        (g non-decreasing)
    """
    n = a.shape[-2]
    out = x.new_empty(*a.shape[:-1], x.shape[-1])  # (..., n, Q)
    state: Tensor | None = None  # (..., P, Q), referenced at g_ref
    g_ref: Tensor | None = None  # (..., 1)
    starts = list(range(0, n, chunk))
    for start in reversed(starts) if reverse else starts:
        sl = slice(start, min(start + chunk, n))
        ac, bc, xc, gc = a[..., sl, :], b[..., sl, :], x[..., sl, :], g[..., sl]
        c = gc.shape[-1]
        keep = torch.ones(c, c, dtype=torch.bool, device=a.device)
        keep = keep.triu() if reverse else keep.tril()  # [r, s]: s >= r or s <= r
        diff = gc.unsqueeze(-1) - gc.unsqueeze(-2)  # (..., C, C): g_r - g_s
        decay = (diff if reverse else -diff).masked_fill(~keep, float("-inf")).exp()
        yc = torch.matmul(torch.matmul(ac, bc.transpose(-2, -1)) * decay, xc)  # (..., C, Q)
        if state is not None:
            # older rows s were re-referenced to g_ref; exp(±(g_r − g_ref)) <= 1
            shift = (gc - g_ref) if reverse else (g_ref - gc)
            yc = yc + torch.matmul(ac, state) * shift.exp().unsqueeze(-1)
        out[..., sl, :] = yc
        g_new = gc[..., :1] if reverse else gc[..., -1:]  # the chunk's min / max of g
        weight = ((g_new - gc) if reverse else (gc - g_new)).exp()  # (..., C) <= 1
        contrib = torch.matmul(bc.transpose(-2, -1), xc * weight.unsqueeze(-1))  # (..., P, Q)
        if state is None:
            state = contrib
        else:
            rescale = ((g_new - g_ref) if reverse else (g_ref - g_new)).exp()  # (..., 1)
            state = state * rescale.unsqueeze(-1) + contrib
        g_ref = g_new
    return out


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
