"""Causal FAVOR+ for affine feature maps, tiled end to end: no (b, h, n, F) tensor, ever.

    log φ(k̂) = B W_F k̂ + β − |k̂|²/2,   log φ(q̂) = B W_F q̂ + β   (x̂ = d^(−1/4) x)
    g_j = max_{i ≤ j} log φ(k̂_i)   (per feature),   φ̃(k_j) = e^{log φ(k̂_j) − g_j}
    φ̃(q_j) = e^{log φ(q̂_j) + g_j − max_f(·)}
    [num_j, den_j] = Σ_{i≤j} φ̃(q_j)ᵀ diag(e^{g_i − g_j}) φ̃(k_i) [v_i, 1]
    out_j = num_j / den_j   (0 where den_j = 0: no key)

Choromanski et al. 2021 ("Rethinking Attention with Performers", arXiv 2009.14794, section
2.6): causal FAVOR+ as a prefix sum; Likhosherstov et al. 2022 (arXiv 2205.15317) for FAVOR++'s
B = √(1 − 4A), β_f = A|ω_f|². The maps with this form say so through
``FeatureMap.fused_affine`` (FAVOR+: B = 1, β = 0; hyperbolic: W_F = [W, −W]; FAVOR++ with a
fixed ρ; W_F may be per head, ``(h, F, d)``). The function is exactly ``favor_causal.py``'s
(the same stabilisers: per-feature running key max, single rows exact at any norm, no future
key in a past output; the same scan, ``causal_linear.py``), but the log-features are formed
*inside* the kernel from q, k and W_F one tile of rows at a time:

- forward: per tile, the projections, g (running max carried from tile to tile), φ̃(q), φ̃(k)
  and the scan's chunks; each tile's rows of out and 1/den are written, nothing else;
- autograd saves q, k, v, W_F, B, β and 1/den (the inputs and n numbers per head; not the
  output, nothing of size n·F);
- backward recomputes each tile's features in both scans (the forward scan for ∂φ̃(q), which
  also recomputes the tile's [num, den], hence ∂den = −(∂out · out) / den; the reverse scan
  for ∂φ̃(k) and ∂v) and contracts them on the spot: ∂q̂ = B ∂L_q W_F,
  ∂k̂ = B ∂L_k W_F − (Σ_f ∂L_k) k̂, ∂W_F += B ∂Lᵀ x̂, ∂β += Σ_rows ∂L, ∂B += Σ ∂L ⊙ W_F x̂
  (∂L = φ̃ ⊙ ∂φ̃). No gradient flows into g nor the per-query max (they cancel exactly).

A ``torch.library`` custom op, opaque to ``torch.compile``; under ``create_graph=True``
backward differentiates ``_reference`` (the same function with plain autograd ops, untiled).
Shapes: q, k ``(b, h, n, d)`` row-aligned (query j sees keys <= j), v ``(b, h, n, d_v)``,
W_F ``(F, d)`` or ``(h, F, d)``, B None / 0-d / ``(b|1, h|1, 1, 1)``, β None / ``(F,)`` /
``(b|1, h|1, 1, F)``, valid None / ``(b, n)`` bool (True = real key) -> out ``(b, h, n, d_v)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo.functional.causal_linear import _scan, scan_rows, tile_rows
from transformer_zoo.functional.favor_causal import cummax_rows, stabilized_query
from transformer_zoo.functional.favor_causal_rows import OnesColumn, OutputGrad, ratio_rows


def _logits(xh: Tensor, w_f: Tensor, b_coef: Tensor | None, beta: Tensor | None,
            key: bool) -> Tensor:
    """B W_F x̂ + β (− |x̂|²/2 for keys), the same ops as the feature maps' own calls."""
    out = torch.matmul(xh, w_f.transpose(-2, -1))
    if b_coef is not None:
        out = out * b_coef
    if beta is not None:
        out = out + beta
    return out - xh.square().sum(-1, keepdim=True) * 0.5 if key else out


class _AffineRows:
    """(φ̃(q), φ̃(k), g) of a tile of rows, from q, k and (W_F, B, β): the ``Rows`` of
    ``scan_rows``. The running key max entering each tile is carried along in forward order
    (and filled by one pass over the keys when a reverse scan asks first)."""

    def __init__(self, q: Tensor, k: Tensor, w_f: Tensor, b_coef: Tensor | None,
                 beta: Tensor | None, valid: Tensor | None, chunk: int, width: int) -> None:
        self.q, self.k, self.w_f, self.b_coef, self.beta, self.valid = q, k, w_f, b_coef, \
            beta, valid
        self.scale = q.shape[-1] ** -0.25
        n, f = q.shape[-2], w_f.shape[-2]
        self.shape = (*q.shape[:-2], n, f)
        self.rows = tile_rows(tuple(q.shape[:-2]), max(f, width), min(chunk, n))  # as scan_rows
        self.tiles = [slice(s, s + self.rows) for s in range(0, n, self.rows)]
        self.starts = [torch.full((*q.shape[:-2], 1, f), float("-inf"), dtype=q.dtype,
                                  device=q.device)]
        self.first = None  # log φ of each sample's first real key, where some start padded
        if valid is not None and not bool(valid[:, 0].all()):  # eager: inside the op
            pos = valid.to(torch.int8).argmax(-1)  # (b,), 0 for a sample without a key
            idx = pos[:, None, None, None].expand(*k.shape[:-2], 1, k.shape[-1])
            first = _logits(k.gather(-2, idx) * self.scale, w_f, b_coef, beta, True)
            self.first = torch.where(valid.any(-1)[:, None, None, None], first, 0.0)

    def query_hat(self, sl: slice) -> Tensor:
        return self.q[..., sl, :] * self.scale

    def key_hat(self, sl: slice) -> Tensor:
        """k̂ of the tile, 0 at padded keys (any content there, even inf, stays out)."""
        kh = self.k[..., sl, :] * self.scale
        return kh if self.valid is None else kh.masked_fill(~self.valid[:, None, sl, None], 0.0)

    def key_logits(self, sl: slice) -> Tensor:
        lk = _logits(self.key_hat(sl), self.w_f, self.b_coef, self.beta, True)
        if self.valid is not None:
            lk.masked_fill_(~self.valid[:, None, sl, None], float("-inf"))  # φ = 0
        return lk

    def _start(self, index: int, lk: Tensor | None = None) -> Tensor:
        while len(self.starts) <= index:  # a reverse scan came first: one pass over the keys
            i = len(self.starts) - 1
            self.starts.append(torch.maximum(self.starts[i], self.key_logits(
                self.tiles[i]).amax(-2, keepdim=True)))
        if lk is not None and len(self.starts) == index + 1 < len(self.tiles):
            self.starts.append(torch.maximum(self.starts[index], lk.amax(-2, keepdim=True)))
        return self.starts[index]

    def __call__(self, index: int, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
        lk = self.key_logits(sl)
        g = torch.maximum(cummax_rows(lk), self._start(index, lk))
        if self.first is not None:
            g = torch.where(torch.isfinite(g), g, self.first)
        lq = _logits(self.query_hat(sl), self.w_f, self.b_coef, self.beta, False)
        return stabilized_query(lq, g), (lk - g).exp_(), g


class _Grads:
    """Accumulates ∂q or ∂k rows and ∂W_F, ∂B, ∂β from ∂L = ∂log φ, one tile at a time."""

    def __init__(self, rows: _AffineRows, need: tuple[bool, bool, bool, bool]) -> None:
        self.rows, (self.need_x, self.need_w, self.need_b, self.need_beta) = rows, need
        lead, (f, d) = rows.shape[:-2], rows.w_f.shape[-2:]
        self.dw = rows.q.new_zeros(*lead, f, d) if self.need_w else None
        self.db = rows.q.new_zeros(*lead, 1, 1) if self.need_b else None
        self.dbeta = rows.q.new_zeros(*lead, 1, f) if self.need_beta else None

    def add(self, dl: Tensor, xh: Tensor, key: bool) -> Tensor | None:
        """∂x (not ∂x̂) of the tile, if needed."""
        b_coef, w_f = self.rows.b_coef, self.rows.w_f
        u = dl if b_coef is None else dl * b_coef
        if self.dw is not None:
            self.dw.add_(torch.matmul(u.transpose(-2, -1), xh))
        if self.dbeta is not None:
            self.dbeta.add_(dl.sum(-2, keepdim=True))
        if not (self.need_x or self.db is not None):
            return None
        dlw = torch.matmul(dl, w_f)  # (b, h, r, d)
        if self.db is not None:
            self.db.add_((dlw * xh).sum((-2, -1), keepdim=True))
        if not self.need_x:
            return None
        dxh = dlw if b_coef is None else dlw * b_coef
        if key:
            dxh = dxh - dl.sum(-1, keepdim=True) * xh
        return dxh.mul_(self.rows.scale)


def _sum_to(t: Tensor | None, like: Tensor | None) -> Tensor:
    if t is None or like is None:
        return torch.empty(0)
    return t.sum() if like.ndim == 0 else t.sum_to_size(like.shape)


def _check_broadcast(w_f: Tensor, b_coef, beta, q: Tensor) -> None:
    lead = q.shape[:-2]
    for name, t in (("W_F", w_f), ("B", b_coef), ("beta", beta)):
        extra = tuple(t.shape[:-2]) if t is not None else ()
        tail = lead[len(lead) - len(extra):] if extra else ()
        if len(extra) > len(lead) or any(e not in (1, s) for e, s in
                                         zip(extra, tail, strict=True)):
            raise ValueError(f"causal_favor_affine: {name} {tuple(t.shape)} does not broadcast "
                             f"into the batch and heads {tuple(lead)}")


def _forward(q: Tensor, k: Tensor, v: Tensor, w_f: Tensor, b_coef: Tensor | None,
             beta: Tensor | None, valid: Tensor | None, chunk: int) -> tuple[Tensor, Tensor]:
    """(out, 1/den): the scan over tiles of rows, each tile's rows written as they come."""
    rows = _AffineRows(q, k, w_f, b_coef, beta, valid, chunk, v.shape[-1] + 1)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    inv = q.new_empty(*q.shape[:-1], 1)

    def sink(index: int, sl: slice, y: Tensor, z) -> None:
        den = y[..., -1:]
        live = den > 0
        out[..., sl, :] = ratio_rows(y)
        inv[..., sl, :] = torch.where(live, 1.0 / torch.where(live, den, 1.0), 0.0)

    scan_rows(rows, OnesColumn(v), None, chunk, sink=sink)
    return out, inv


@torch.library.custom_op("transformer_zoo::causal_favor_affine", mutates_args=())
def _affine_op(q: Tensor, k: Tensor, v: Tensor, w_f: Tensor, b_coef: Tensor | None,
               beta: Tensor | None, valid: Tensor | None, chunk: int) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, w_f, b_coef, beta, valid, chunk)


@_affine_op.register_fake
def _(q, k, v, w_f, b_coef, beta, valid, chunk):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(*q.shape[:-1], 1)


def _gradients(q: Tensor, k: Tensor, v: Tensor, w_f: Tensor, b_coef: Tensor | None,
               beta: Tensor | None, valid: Tensor | None, inv: Tensor,
               grad: Tensor, chunk: int, need: list[bool]) -> list[Tensor]:
    """∂q from the forward scan (∂L_q = φ̃(q) ⊙ ∂φ̃(q)), ∂k and ∂v from one reverse scan
    (∂L_k = φ̃(k) ⊙ ∂φ̃(k)); ∂W_F, ∂B, ∂β from both. Features recomputed per tile, and the
    output too: the forward scan also gives each tile's [num, den] (the forward's own rows),
    hence ∂den = −(∂out · out) / den, before that tile's ∂φ̃(q) needs it."""
    need_q, need_k, need_v, need_w, need_b, need_beta = need
    rows = _AffineRows(q, k, w_f, b_coef, beta, valid, chunk, v.shape[-1] + 1)
    params = (need_w, need_b and b_coef is not None, need_beta and beta is not None)
    acc = _Grads(rows, (True, *params))
    dy, x = OutputGrad(grad, inv), OnesColumn(v)
    dq = torch.empty_like(q) if need_q else None
    if need_q or any(params):
        def query_sink(index: int, sl: slice, y, dl: Tensor) -> None:
            acc.need_x = need_q
            dx = acc.add(dl, rows.query_hat(sl), key=False)
            if dx is not None:
                dq[..., sl, :] = dx

        scan_rows(rows, x, dy.h_rows, chunk, want_y=True, times_a=True, sink=query_sink)
    elif need_k or need_v:  # ∂den alone, for the reverse scan
        scan_rows(rows, x, None, chunk, sink=lambda index, sl, y, z: dy.h_rows(index, sl, y))
    dk = torch.empty_like(k) if need_k else None
    dv = torch.empty_like(v) if need_v else None
    if need_k or need_v or any(params):
        def key_sink(index: int, sl: slice, y: Tensor | None, dl: Tensor) -> None:
            if dv is not None:
                dv[..., sl, :] = y[..., :-1]
            acc.need_x = need_k
            dx = acc.add(dl, rows.key_hat(sl), key=True)
            if dx is not None:
                dk[..., sl, :] = dx if valid is None else dx.masked_fill_(
                    ~valid[:, None, sl, None], 0.0)

        scan_rows(rows, dy, x, chunk, want_y=need_v, reverse=True, swap=True, times_a=True,
                  sink=key_sink)
    return [q.new_empty(0) if t is None else t for t in (
        dq, dk, dv, _sum_to(acc.dw, w_f) if need_w else None,
        _sum_to(acc.db, b_coef) if params[1] else None,
        _sum_to(acc.dbeta, beta) if params[2] else None)]


@torch.library.custom_op("transformer_zoo::causal_favor_affine_backward", mutates_args=())
def _affine_backward_op(q: Tensor, k: Tensor, v: Tensor, w_f: Tensor, b_coef: Tensor | None,
                        beta: Tensor | None, valid: Tensor | None, inv: Tensor,
                        grad: Tensor, chunk: int, need: list[bool]) -> list[Tensor]:
    return _gradients(q, k, v, w_f, b_coef, beta, valid, inv, grad, chunk, need)


@_affine_backward_op.register_fake
def _(q, k, v, w_f, b_coef, beta, valid, inv, grad, chunk, need):
    likes = (q, k, v, w_f, b_coef, beta)
    return [torch.empty_like(t) if flag and t is not None else q.new_empty(0)
            for t, flag in zip(likes, need, strict=True)]


def _reference(q, k, v, w_f, b_coef, beta, valid, chunk: int) -> Tensor:
    """The same output with differentiable ops, untiled (what double backward differentiates);
    the stabilisers g and the per-query max are constants, as in the kernel."""
    rows = _AffineRows(q.detach(), k.detach(), w_f.detach(), None if b_coef is None else
                       b_coef.detach(), None if beta is None else beta.detach(), valid, chunk,
                       v.shape[-1] + 1)
    g = torch.cat([rows(i, sl)[2] for i, sl in enumerate(rows.tiles)], -2)  # constants
    scale = rows.scale
    kh = k * scale if valid is None else (k * scale).masked_fill(~valid[:, None, :, None], 0.0)
    lk = _logits(kh, w_f, b_coef, beta, True)
    if valid is not None:
        lk = lk.masked_fill(~valid[:, None, :, None], float("-inf"))
    lq = _logits(q * scale, w_f, b_coef, beta, False)
    x = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
    y = _scan(stabilized_query(lq, g), (lk - g).exp(), x, g, None, chunk)[0]
    den = y[..., -1:]
    live = den > 0
    return torch.where(live, y[..., :-1] / torch.where(live, den, 1.0), 0.0)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, w_f, b_coef, beta, valid, chunk = inputs
    _out, inv = output  # out is not saved: backward recomputes its rows (``_gradients``)
    ctx.save_for_backward(q, k, v, w_f, b_coef, beta, valid, inv)
    ctx.chunk = chunk
    ctx.mark_non_differentiable(inv)


def _backward(ctx, grad: Tensor, _grad_inv):
    q, k, v, w_f, b_coef, beta, valid, inv = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:6])
    if torch.is_grad_enabled():  # create_graph=True: differentiate the same function, eagerly
        inputs = (q, k, v, w_f, b_coef, beta)
        wanted = [t for t, n in zip(inputs, need, strict=True) if n]
        ref = _reference(q, k, v, w_f, b_coef, beta, valid, ctx.chunk)
        found = iter(torch.autograd.grad(ref, wanted, grad, create_graph=True,
                                         allow_unused=True))
        return (*(next(found) if n else None for n in need), None, None)
    grads = _affine_backward_op(q, k, v, w_f, b_coef, beta, valid, inv, grad, ctx.chunk, need)
    return (*(t if n else None for t, n in zip(grads, need, strict=True)), None, None)


_affine_op.register_autograd(_backward, setup_context=_setup_context)


def causal_favor_affine(q: Tensor, k: Tensor, v: Tensor, w_f: Tensor, b_coef: Tensor | None,
                        beta: Tensor | None, valid: Tensor | None = None, *,
                        chunk: int = 128) -> Tensor:
    """Causal FAVOR+ ``out (b, h, n, d_v)`` for log φ(x̂) = B W_F x̂ + β − |x̂|²/2 (see the
    module docstring); q, k, v row-aligned ``(b, h, n, ·)``. Gradients to q, k, v, W_F, B, β."""
    _check_broadcast(w_f, b_coef, beta, q)
    return _affine_op(q, k, v, w_f, b_coef, beta, valid, chunk)[0]
