"""Transformer-XL's bias rows for the blockwise kernels: a skewed matmul, gradients summed once.

    B_ij = [(q_i + v)ᵀ W_R R_{pos_i − pos_j} + uᵀ k_j] · s        (terms (b) + (d) and (c))

Dai et al. 2019, "Transformer-XL", arXiv 1901.02860, §3.3 (the terms of
``functional.transformer_xl``). For positions that step by one (each sample an offset
``arange``: any offset, keys of a memory before the queries) the distance of (i, j) is
pos_q0 − pos_k0 + i − j, so with the W_R R table stored by *descending* distance (row
t = n − 1 − i + j) the rows i0:i1 of a block read the window t ∈ [n − i1, n − i0 + m − 1)
of W = rows + m − 1 distances, and B[i, j] = P[i, rows − 1 − (i − i0) + j] for the block's
``(b, h, rows, W)`` product P = (Q_I + v) · s · Tableᵀ: a strided view of P (the reference
code's ``_rel_shift`` skew, offset rows − 1, row stride W − 1), no index tensor, no gather.
Exact (the same products as ``transformer_xl_bias``, to rounding).

Gradients: the blockwise kernel pulls each block's dS back through its rows. A block's
backward here writes its share straight into per-call sums (dS_I skewed back into
dP_I, then d(q + v)_I = dP_I · Table_W and dTable_W += dP_Iᵀ (Q_I + v) s, Σ_i dS_ij for
uᵀk) and hands back only a scalar zero to a per-call node, whose backward (once, after every
block) turns the sums into the gradients of q, k, u, v and W_R: dW_R = dTableᵀ · R, with R
recomputed in chunks of distances. So no block builds a full-size gradient of the table or
of q, the ``(T, D)`` sinusoid R is never kept, and the forward's table is built under
``no_grad`` in chunks (its peak: the table, not R beside it). Memory per call: the table
``(1|b, h, T, d)`` and, in the backward, its gradient and the ``(b, h, n, d)`` sum for q.

Shapes: b batch, h heads, n query / m key length, d head dim, D sinusoid width, T = n + m − 1
distances. q ``(b, h, n, d)``, k ``(b, h, m, d)``; positions int64 ``(n,)``/``(b, n)`` and
``(m,)``/``(b, m)``; rows ``(b, h, i1 − i0, m)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import check_positive_int
from transformer_zoo.functional import transformer_xl as _txl
from transformer_zoo.functional.relative import relative_positions

#: distances per chunk when the table is built from R and dW_R pulled back through it
CHUNK = 2048


def _step_one(p: Tensor) -> bool:
    return p.shape[-1] < 2 or bool((p.diff(dim=-1) == 1).all())


class _Sums:
    """Per-call state: the inputs (detached), the table and the backward's running sums."""

    def __init__(self, q, k, u, v, r_weight, hi, base, scale):
        self.q, self.k, self.u, self.v, self.r_weight = q, k, u, v, r_weight
        self.hi, self.base, self.scale = hi, base, scale  # hi (1|b,): largest distance
        n, m = q.shape[2], k.shape[2]
        self.size = n + m - 1
        with torch.no_grad():
            self.table = self._table()  # (1|b, h, T, d), row t: distance hi − t
            self.content = (k @ (u.to(k.dtype) * scale)[:, :, None]).transpose(-1, -2)
        self.reset()

    def reset(self) -> None:
        self.d_qv = self.d_table = self.d_content = None

    def distances(self, t0: int, t1: int) -> Tensor:
        return self.hi[:, None] - torch.arange(t0, t1, device=self.hi.device)  # (1|b, t)

    def _table(self) -> Tensor:
        b, h, _, d = self.q.shape
        out = self.q.new_empty(self.hi.shape[0], h, self.size, d)
        for t0 in range(0, self.size, CHUNK):
            t1 = min(t0 + CHUNK, self.size)
            rel = _txl.transformer_xl_sinusoid(self.distances(t0, t1), self.r_weight.shape[1],
                                               base=self.base, dtype=self.r_weight.dtype)
            out[:, :, t0:t1] = F.linear(rel, self.r_weight).unflatten(-1, (h, d)).transpose(
                1, 2)
        return out

    def qv(self, i0: int, i1: int) -> Tensor:
        return (self.q[:, :, i0:i1] + self.v.to(self.q.dtype)[:, None]) * self.scale

    def window(self, i0: int, i1: int) -> tuple[int, int]:
        n, m = self.q.shape[2], self.k.shape[2]
        return n - i1, n - i0 + m - 1


def _skew(p: Tensor, m: int) -> Tensor:
    """(b, h, rows, W) -> the (b, h, rows, m) view [i, j] -> p[i, rows − 1 − i + j]."""
    b, h, rows, w = p.shape
    return p.as_strided((b, h, rows, m), (h * rows * w, rows * w, w - 1, 1),
                        p.storage_offset() + rows - 1)


class _Rows(torch.autograd.Function):
    """``apply(token, sums, i0, i1)`` -> bias rows i0:i1; backward: into ``sums``."""

    @staticmethod
    def forward(ctx, token: Tensor, sums: _Sums, i0: int, i1: int) -> Tensor:
        ctx.sums, ctx.i0, ctx.i1 = sums, i0, i1
        t0, t1 = sums.window(i0, i1)
        p = sums.qv(i0, i1) @ sums.table[:, :, t0:t1].transpose(-1, -2)  # (b, h, rows, W)
        return _skew(p, sums.k.shape[2]) + sums.content  # + uᵀk_j s, (b, h, 1, m)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        sums, i0, i1 = ctx.sums, ctx.i0, ctx.i1
        q, k, table = sums.q, sums.k, sums.table
        b, h, n, d = q.shape
        m = k.shape[2]
        if sums.d_qv is None:
            sums.d_qv = torch.zeros_like(q)
            sums.d_table = torch.zeros_like(table)
            sums.d_content = q.new_zeros(b, h, m)
        grad = grad.to(q.dtype).expand(b, h, i1 - i0, m)
        sums.d_content += grad.sum(-2)
        t0, t1 = sums.window(i0, i1)
        dp = q.new_zeros(b, h, i1 - i0, t1 - t0)
        _skew(dp, m).copy_(grad)  # every (i, j) its own element of dP
        tw = table[:, :, t0:t1]
        sums.d_qv[:, :, i0:i1] += dp @ tw
        qv = sums.qv(i0, i1)
        acc = sums.d_table[:, :, t0:t1]
        for i in range(b):  # acc += dPᵀ (q + v) s, in place, summed over a shared table
            acc[i % acc.shape[0]].baddbmm_(dp[i].transpose(-1, -2), qv[i])
        return grad.new_zeros(()), None, None, None


class _Shared(torch.autograd.Function):
    """``apply(sums, q, k, u, v, r_weight)`` -> a scalar zero token every block reads; its
    backward turns the sums of every block into the inputs' gradients."""

    @staticmethod
    def forward(ctx, sums: _Sums, q, k, u, v, r_weight) -> Tensor:
        ctx.sums = sums
        return q.new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad: Tensor):
        sums = ctx.sums
        need = ctx.needs_input_grad
        if sums.d_qv is None:
            return None, None, None, None, None, None
        s = sums.scale
        d_qv, d_table, d_content = sums.d_qv, sums.d_table, sums.d_content
        sums.reset()
        u, v, w = sums.u, sums.v, sums.r_weight
        g_v = (d_qv.sum((0, 2)) * s).to(v.dtype) if need[4] else None
        g_q = d_qv.mul_(s) if need[1] else None
        g_k = (d_content[..., None] * (u.to(d_content.dtype) * s)[:, None]) if need[2] else None
        g_u = ((d_content[..., None] * sums.k).sum((0, 2)) * s).to(u.dtype) if need[3] else None
        g_w = None
        if need[5]:  # dW_R = Σ_t dTable_tᵀ R_t, R recomputed a chunk of distances at a time
            g_w = torch.zeros_like(w)
            flat = d_table.transpose(1, 2).flatten(2).to(w.dtype)  # (1|b, T, h·d)
            for t0 in range(0, sums.size, CHUNK):
                t1 = min(t0 + CHUNK, sums.size)
                rel = _txl.transformer_xl_sinusoid(sums.distances(t0, t1), w.shape[1],
                                                   base=sums.base, dtype=w.dtype)
                for i in range(flat.shape[0]):
                    g_w.addmm_(flat[i, t0:t1].transpose(0, 1), rel[i])
        return None, g_q, g_k, g_u, g_v, g_w


def transformer_xl_skewed_rows(
    q: Tensor, k: Tensor, *, u: Tensor, v: Tensor, r_weight: Tensor, q_positions: Tensor,
    k_positions: Tensor, clamp_len: int | None, base: float, scale: float,
) -> Callable[[int, int], Tensor] | None:
    """``rows(i0, i1)`` -> rows i0:i1 of ``transformer_xl_bias`` (see the module), or None
    where this path does not apply: positions that do not step by one, distances that
    ``clamp_len`` would clip, autocast or ``torch.compile`` (then ``transformer_xl_bias_rows``
    gathers), or no queries or keys."""
    _txl._check_inputs(q, k, u, v, r_weight)
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(q.device.type) or (
            q.shape[2] == 0 or k.shape[2] == 0):
        return None
    relative_positions(q_positions[..., :1], k_positions[..., :1])  # dtype/rank checks
    if clamp_len is not None:
        clamp_len = check_positive_int(clamp_len, "clamp_len")
    qp = q_positions if q_positions.ndim == 2 else q_positions[None]  # (1|b, n)
    kp = k_positions if k_positions.ndim == 2 else k_positions[None]  # (1|b, m)
    if not (_step_one(qp) and _step_one(kp)):
        return None
    hi = qp[:, -1] - kp[:, 0]  # (1|b,): the largest distance, n + m − 1 of them below it
    lo = qp[:, 0] - kp[:, -1]
    if clamp_len is not None and bool(((lo < -clamp_len) | (hi > clamp_len)).any()):
        return None
    if hi.shape[0] > 1 and bool((hi == hi[0]).all()):
        hi = hi[:1]  # one table serves the batch
    sums = _Sums(q.detach(), k.detach(), u.detach(), v.detach(), r_weight.detach(), hi,
                 base, scale)
    token = _Shared.apply(sums, q, k, u, v, r_weight)

    def rows(i0: int, i1: int) -> Tensor:
        return _Rows.apply(token, sums, i0, i1)

    return rows
