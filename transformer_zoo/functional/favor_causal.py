"""Causal FAVOR+ from log-features, fused: running key max, stabilised features, prefix sum.

    g_j = max_{i ≤ j} log φ(k_i)   (per feature),   φ̃(k_j) = e^{log φ(k_j) − g_j} <= 1,
    φ̃(q_j) = e^{log φ(q_j) + g_j − max_f(log φ(q_j) + g_j)} <= 1   (largest feature exactly 1)
    Y_j = Σ_{i ≤ j} Σ_f φ̃(q_j)_f φ̃(k_i)_f e^{g_i,f − g_j,f} x_i
        = e^{−max_f(…)} Σ_{i ≤ j} φ(q_j)ᵀφ(k_i) x_i

Choromanski et al. 2021 (arXiv 2009.14794), section 2.6: causal FAVOR+ as a prefix sum; the
scan is ``causal_linear.py``'s exact chunked recurrence with a per-feature decay. With
x = [v, 1] the last column is the denominator, whose largest term is exactly 1 at any norm.

Fused like the bidirectional ``favor_fused.py``: the kernel receives log φ(q) and log φ(k)
(−inf at padded keys), computes g, φ̃(q), φ̃(k) one tile of rows at a time inside the scan,
and autograd saves only its inputs, O(n(F + d)); backward recomputes the features tile by
tile. No gradient flows into g nor the per-query max (stabilisers: they cancel exactly).
A ``torch.library`` custom op, opaque to ``torch.compile`` (no length-specialising loop is
traced). Shapes: log φ(q), log φ(k) ``(..., n, F)`` row-aligned (query j sees keys <= j);
x ``(..., n, Q)``; output ``(..., n, Q)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transformer_zoo.functional.causal_linear import _scan, scan_rows, tile_rows


def cummax_rows(x: Tensor) -> Tensor:
    """Running max along dim −2 of a tensor that needs no gradient. Eager: in blocks of about
    √n rows, in place (``torch.cummax`` along a non-last dim is ~10× slower on CPU);
    compiled: ``cummax`` (loops over n would specialise the graph on the length). Max is
    exact, so both agree bit for bit."""
    n = x.shape[-2]
    if torch.compiler.is_compiling() or n < 4:
        return x.cummax(-2).values
    c = math.isqrt(n)
    blocks = -(-n // c)
    pad = blocks * c - n
    y = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], -2) if pad \
        else x.clone()
    yb = y.view(*x.shape[:-2], blocks, c, x.shape[-1])
    for i in range(1, c):  # within each block
        torch.maximum(yb[..., i, :], yb[..., i - 1, :], out=yb[..., i, :])
    tops = yb[..., -1, :]  # (..., N, F), a view: each block's last row
    for j in range(1, blocks):  # across block ends
        torch.maximum(tops[..., j, :], tops[..., j - 1, :], out=tops[..., j, :])
    rest = yb[..., 1:, :-1, :]
    torch.maximum(rest, tops[..., :-1, None, :], out=rest)
    return y[..., :n, :]


def stabilized_query(qz: Tensor, g: Tensor) -> Tensor:
    """exp(log φ(q) + g − max_f(log φ(q) + g)): query features relative to the key
    stabiliser g, largest 1 (the max is detached: it cancels)."""
    qz = qz + g
    return qz.sub_(qz.detach().amax(-1, keepdim=True)).exp_()  # in place on the fresh sum


def first_valid(lk: Tensor) -> Tensor:
    """The log-features of each sample's first real key (keys are −inf where padded),
    ``(..., 1, F)``; 0 for a sample with none. It fills g before that key: g stays
    non-decreasing, and rows before it output 0 whatever g holds."""
    live = torch.isfinite(lk[..., :1]).to(torch.int8)  # (..., n, 1)
    first = lk.gather(-2, live.argmax(-2, keepdim=True).expand(*lk.shape[:-2], 1, lk.shape[-1]))
    return torch.where(torch.isfinite(first), first, 0.0)


class _Features:
    """(φ̃(q), φ̃(k), g) of a tile of rows, from lq, lk (any tile, in any order)."""

    def __init__(self, lq: Tensor, lk: Tensor, rows: int) -> None:
        self.lq, self.lk, self.shape = lq, lk, lk.shape
        self.first = first_valid(lk)
        self.padded = not bool(torch.isfinite(lk[..., :1]).all())  # eager: inside the op
        self.starts = []  # running max of lk before each tile
        top = torch.full_like(self.first, float("-inf"))
        for start in range(0, lk.shape[-2], rows):
            self.starts.append(top)
            top = torch.maximum(top, lk[..., start:start + rows, :].amax(-2, keepdim=True))

    def __call__(self, index: int, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
        lk = self.lk[..., sl, :]
        g = torch.maximum(cummax_rows(lk), self.starts[index])
        if self.padded:
            g = torch.where(torch.isfinite(g), g, self.first)
        return stabilized_query(self.lq[..., sl, :], g), (lk - g).exp_(), g


def _features(lq: Tensor, lk: Tensor, chunk: int, width: int) -> _Features:
    lead, n = lk.shape[:-2], lk.shape[-2]
    return _Features(lq, lk, tile_rows(tuple(lead), width, min(chunk, n)))


@torch.library.custom_op("transformer_zoo::causal_favor", mutates_args=())
def _favor_op(lq: Tensor, lk: Tensor, x: Tensor, chunk: int) -> Tensor:
    feats = _features(lq, lk, chunk, max(lk.shape[-1], x.shape[-1]))
    return scan_rows(feats, x, None, chunk)[0].contiguous()


@_favor_op.register_fake
def _(lq, lk, x, chunk):
    return x.new_empty(*lk.shape[:-1], x.shape[-1])


@torch.library.custom_op("transformer_zoo::causal_favor_backward", mutates_args=())
def _favor_backward_op(lq: Tensor, lk: Tensor, x: Tensor, grad: Tensor, chunk: int,
                       need_q: bool, need_kx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """∂lq = φ̃(q) ⊙ ∂φ̃(q) (a forward scan), ∂lk = φ̃(k) ⊙ ∂φ̃(k) and ∂x (one reverse scan),
    the features recomputed per tile."""
    feats = _features(lq, lk, chunk, max(lk.shape[-1], x.shape[-1]))
    empty = x.new_empty(0)
    dq = scan_rows(feats, x, grad, chunk, want_y=False, times_a=True)[1] if need_q else empty
    dx, dk = scan_rows(feats, grad, x, chunk, reverse=True, swap=True, times_a=True) \
        if need_kx else (empty, empty)
    return dq.contiguous(), dk.contiguous(), dx.contiguous()


@_favor_backward_op.register_fake
def _(lq, lk, x, grad, chunk, need_q, need_kx):
    empty = x.new_empty(0)
    return (torch.empty_like(lq) if need_q else empty, torch.empty_like(lk) if need_kx else empty,
            torch.empty_like(x) if need_kx else empty)


def _setup_context(ctx, inputs, output) -> None:
    lq, lk, x, chunk = inputs
    ctx.save_for_backward(lq, lk, x)
    ctx.chunk = chunk


def _backward(ctx, grad: Tensor):
    lq, lk, x = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the same function, eagerly
        inputs = [t for t, n in zip((lq, lk, x), need, strict=True) if n]
        g = cummax_rows(lk.detach())
        g = torch.where(torch.isfinite(g), g, first_valid(lk.detach()))
        y = _scan(stabilized_query(lq, g), (lk - g).exp(), x, g, None, ctx.chunk)[0]
        found = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
        return (*(next(found) if n else None for n in need), None)
    dq, dk, dx = _favor_backward_op(lq, lk, x, grad.contiguous(), ctx.chunk, need[0],
                                    need[1] or need[2])
    return (dq if need[0] else None, dk if need[1] else None, dx if need[2] else None, None)


_favor_op.register_autograd(_backward, setup_context=_setup_context)


def causal_favor(lq: Tensor, lk: Tensor, x: Tensor, *, chunk: int = 128) -> Tensor:
    """``Σ_{i≤j} φ̃(q_j)ᵀ φ̃(k_i) x_i`` from log-features (see the module docstring)."""
    return _favor_op(lq, lk, x, chunk)
