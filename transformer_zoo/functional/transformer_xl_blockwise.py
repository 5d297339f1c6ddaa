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

from transformer_zoo.functional import transformer_xl as _txl

#: distances per chunk of the table and of its gradient (each built, flushed and freed whole)
CHUNK = 1024


def _step_one(p: Tensor) -> bool:
    return p.shape[-1] < 2 or bool((p.diff(dim=-1) == 1).all())


def _skew(p: Tensor, m: int) -> Tensor:
    """(rows, W) contiguous -> the (rows, m) view [i, j] -> p[i, rows − 1 − i + j]."""
    rows, w = p.shape
    return p.as_strided((rows, m), (w - 1, 1), p.storage_offset() + rows - 1)


class _Sums:
    """Per-call state: the inputs (detached), the table's chunks, the backward's running sums.

    The table (row t: distance hi − t) and its gradient live in chunks of ``CHUNK`` distances,
    built on first use; a chunk wholly above a block's window is dropped (the table's, rebuilt
    if a later block needs it) or flushed into dW_R (the gradient's). Blocks in ascending
    order (as the kernels run them) move the window down, so about W + CHUNK rows of each are
    alive, not all T; any order is exact (a flushed chunk touched again starts from zero)."""

    def __init__(self, q, k, u, v, r_weight, hi, base, scale, need_w):
        self.q, self.k, self.u, self.v, self.r_weight = q, k, u, v, r_weight
        self.hi, self.base, self.scale, self.need_w = hi, base, scale, need_w
        self.size = q.shape[2] + k.shape[2] - 1  # T
        self.tables: dict[int, Tensor] = {}
        with torch.no_grad():
            self.content = (k @ (u.to(k.dtype) * scale)[:, :, None]).transpose(-1, -2)
        self.reset()

    def reset(self) -> None:
        self.d_qv = self.d_content = self.g_w = None
        self.d_tables: dict[int, Tensor] = {}

    def rel(self, c: int) -> Tensor:
        """R of chunk c's distances, ``(1|b, rows, D)`` in W_R's dtype."""
        t = torch.arange(c * CHUNK, min((c + 1) * CHUNK, self.size), device=self.hi.device)
        return _txl.transformer_xl_sinusoid(self.hi[:, None] - t, self.r_weight.shape[1],
                                            base=self.base, dtype=self.r_weight.dtype)

    def table(self, c: int) -> Tensor:
        """Chunk c of the W_R R table ``(1|b, h, rows, d)``."""
        if c not in self.tables:
            h, d = self.q.shape[1], self.q.shape[3]
            with torch.no_grad():
                self.tables[c] = F.linear(self.rel(c), self.r_weight).unflatten(
                    -1, (h, d)).transpose(1, 2).contiguous().to(self.q.dtype)
        return self.tables[c]

    def d_table(self, c: int) -> Tensor:
        if c not in self.d_tables:
            self.d_tables[c] = torch.zeros_like(self.table(c))
        return self.d_tables[c]

    def flush(self, above: int) -> None:
        """dW_R += dTable_cᵀ R_c for the gradient chunks starting at or above ``above``."""
        for c in [c for c in self.d_tables if c * CHUNK >= above]:
            g = self.d_tables.pop(c).to(self.r_weight.dtype)
            if self.g_w is None:
                self.g_w = torch.zeros_like(self.r_weight)
            per_head = self.g_w.view(g.shape[1], g.shape[3], -1)  # (h, d, D)
            rel = self.rel(c)
            for i in range(g.shape[0]):
                for j in range(g.shape[1]):
                    per_head[j].addmm_(g[i, j].T, rel[i % rel.shape[0]])

    def pieces(self, i0: int, i1: int):
        """The block's window [t0, t1) of W = rows + m − 1 distances by chunk: (c, a, z, t0),
        rows a:z of chunk c are columns a + c·CHUNK − t0 … of the window."""
        n, m = self.q.shape[2], self.k.shape[2]
        t0, t1 = n - i1, n - i0 + m - 1
        for key in [c for c in self.tables if c * CHUNK >= t1]:
            del self.tables[key]  # above the window: blocks below never read it
        for c in range(t0 // CHUNK, (t1 - 1) // CHUNK + 1):
            lo = c * CHUNK
            yield c, max(t0, lo) - lo, min(t1, lo + CHUNK) - lo, lo - t0

    def qv(self, i0: int, i1: int) -> Tensor:
        return (self.q[:, :, i0:i1] + self.v.to(self.q.dtype)[:, None]) * self.scale


class _Rows(torch.autograd.Function):
    """``apply(token, sums, i0, i1)`` -> bias rows i0:i1; backward: into ``sums``."""

    @staticmethod
    def forward(ctx, token: Tensor, sums: _Sums, i0: int, i1: int) -> Tensor:
        ctx.sums, ctx.i0, ctx.i1 = sums, i0, i1
        qv = sums.qv(i0, i1)
        b, h, rows, _ = qv.shape
        m = sums.k.shape[2]
        out = qv.new_empty(b, h, rows, m)
        p = qv.new_empty(rows, rows + m - 1)  # one matrix of P at a time
        pieces = list(sums.pieces(i0, i1))
        for i in range(b):
            for j in range(h):
                for c, a, z, col in pieces:  # P = (q + v) s Tableᵀ, chunk by chunk
                    table = sums.table(c)
                    torch.mm(qv[i, j], table[i % table.shape[0], j, a:z].T,
                             out=p[:, col + a:col + z])
                torch.add(_skew(p, m), sums.content[i % sums.content.shape[0], j],
                          out=out[i, j])  # + uᵀk_j s
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        sums, i0, i1 = ctx.sums, ctx.i0, ctx.i1
        q = sums.q
        b, h, _, d = q.shape
        m = sums.k.shape[2]
        rows = i1 - i0
        if sums.d_qv is None:
            sums.d_qv = torch.zeros_like(q)
            sums.d_content = q.new_zeros(b, h, m)
        grad = grad.to(q.dtype).expand(b, h, rows, m)
        sums.d_content += grad.sum(-2)
        qv = sums.qv(i0, i1)
        pieces = list(sums.pieces(i0, i1))
        dp = q.new_empty(rows, rows + m - 1)  # one matrix of dP at a time
        for i in range(b):
            for j in range(h):
                dp.zero_()
                _skew(dp, m).copy_(grad[i, j])  # every (i, j) its own element of dP
                for c, a, z, col in pieces:  # d(q + v) += dP Table, dTable += dPᵀ (q + v) s
                    table = sums.table(c)
                    tb = i % table.shape[0]
                    sums.d_qv[i, j, i0:i1].addmm_(dp[:, col + a:col + z], table[tb, j, a:z])
                    if sums.need_w:
                        sums.d_table(c)[tb, j, a:z].addmm_(dp[:, col + a:col + z].T, qv[i, j])
        if sums.need_w:
            sums.flush(above=pieces[-1][0] * CHUNK + CHUNK)  # chunks above the window
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
        sums.tables.clear()  # every block is done (rebuilt if a retained graph runs again)
        sums.flush(above=0)
        s = sums.scale
        d_qv, d_content, g_w = sums.d_qv, sums.d_content, sums.g_w
        sums.reset()
        u, v = sums.u, sums.v
        g_v = (d_qv.sum((0, 2)) * s).to(v.dtype) if need[4] else None
        g_q = d_qv.mul_(s) if need[1] else None
        g_k = (d_content[..., None] * (u.to(d_content.dtype) * s)[:, None]) if need[2] else None
        g_u = ((d_content[..., None] * sums.k).sum((0, 2)) * s).to(u.dtype) if need[3] else None
        return None, g_q, g_k, g_u, g_v, g_w if need[5] else None


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
    qp, kp, clamp_len = _txl.row_positions(q_positions, k_positions, clamp_len)
    if not (_step_one(qp) and _step_one(kp)):
        return None
    hi = qp[:, -1] - kp[:, 0]  # (1|b,): the largest distance, n + m − 1 of them below it
    lo = qp[:, 0] - kp[:, -1]
    if clamp_len is not None and bool(((lo < -clamp_len) | (hi > clamp_len)).any()):
        return None
    if hi.shape[0] > 1 and bool((hi == hi[0]).all()):
        hi = hi[:1]  # one table serves the batch
    sums = _Sums(q.detach(), k.detach(), u.detach(), v.detach(), r_weight.detach(), hi,
                 base, scale, need_w=r_weight.requires_grad and torch.is_grad_enabled())
    token = _Shared.apply(sums, q, k, u, v, r_weight)

    def rows(i0: int, i1: int) -> Tensor:
        return _Rows.apply(token, sums, i0, i1)

    return rows
