"""Causal linear attention with a per-feature decay: an exact chunked prefix sum, O(n(P+Q)).

    Y_r = Σ_{s ≤ r} Σ_p a_{r,p} b_{s,p} e^{g_{s,p} − g_{r,p}} x_s       (g non-decreasing in s)
        = a_rᵀ S_r,    S_r = diag(e^{g_(r−1) − g_r}) S_(r−1) + b_r x_rᵀ

Katharopoulos et al. 2020 ("Transformers are RNNs", arXiv 2006.16236) write causal linear
attention as the recurrence S_r = S_(r−1) + b_r x_rᵀ; Choromanski et al. 2021 (arXiv
2009.14794, section 2.6) use it for causal FAVOR+. The diagonal decay (as in gated linear
attention, Yang et al. 2023, arXiv 2312.06635) carries FAVOR's *per-feature running key
stabiliser*: key features are stored as e^{log φ(k_s) − g_s} with g_s the running max of each
feature over keys ≤ s, and query r's features are taken relative to g_r. Every factor is ≤ 1,
the largest term of every denominator is exactly 1, and no key after r enters output r.

Chunks of C rows: the state entering a chunk is referenced per feature to g at the previous
chunk's end (R), so the carry multiplies by e^{R_old − R_new} ≤ 1 and the inter-chunk factors
are ≤ 1. Inside a chunk one reference R is exact while g rises by at most ``max_rise`` nats
above it (half the exponent range: fp32 43.7, fp64 354): then (a_r e^{R−g_r})(b_s e^{g_s−R})
keeps both factors normal for every term that matters. Rows that rise further (huge norms)
are redone by the same algorithm on their chunk in chunks 8× smaller, down to single rows,
whose only in-chunk term (s = r) needs no reference: exact at every norm. Whether a row is
redone depends only on keys ≤ r, so a future key never changes a past output.

Shapes: a, b ``(..., n, P)``; x ``(..., n, Q)``; g ``(..., n, P)`` (per feature) or
``(..., n, 1)`` (one scalar per row, e.g. for feature rotations); output ``(..., n, Q)``.

Memory: rows go through in tiles of about ``TILE_ELEMENTS`` entries, each with one P × Q
state per chunk and its C × C blocks: O(n(P + Q)) outputs plus tile-sized temporaries. The
kernel is a ``torch.library`` custom op: under ``torch.compile`` it is one opaque node (its
loops never specialise a graph on the length). Autograd saves only the inputs (O(n(P+Q)))
and recomputes: ∂a = S_r ∂Y_r (a forward scan), ∂b and ∂x from one reverse scan; under
``create_graph=True`` backward differentiates the eager kernel instead.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

TILE_ELEMENTS = 1 << 18  # about this many (row × feature) entries are processed at once
_SUBDIVIDE = 8  # rows that rise too far are redone in chunks this many times smaller
MIN_TILE_ROWS = 32  # a tile (and then a chunk) is never cut below this many rows


def max_rise(dtype: torch.dtype) -> float:
    """The largest rise of g (nats) above a chunk's reference that one reference handles
    exactly: half the exponent range, so a term t >= e^(−max_rise) keeps both of its factors
    >= t·e^(−max_rise) >= the smallest normal number (smaller terms are below ε² of the
    denominator, which is >= 1)."""
    return -math.log(torch.finfo(dtype).tiny) / 2


def tile_rows(lead: tuple[int, ...], width: int, chunk: int) -> int:
    """Rows per tile: a multiple of the chunk holding about ``TILE_ELEMENTS`` entries. Where one
    chunk alone holds more (wide features, many heads), a tile is fewer rows, down to
    ``MIN_TILE_ROWS``, and ``scan_rows`` runs its chunks at that size (the scan is exact for
    any chunk: only rounding differs)."""
    per_row = max(1, math.prod(lead) * width)
    if chunk * per_row > TILE_ELEMENTS:
        return min(chunk, max(MIN_TILE_ROWS, TILE_ELEMENTS // per_row))
    return chunk * max(1, TILE_ELEMENTS // (per_row * chunk))


class Rows:
    """The scan's inputs a, b, g, served a tile of rows at a time (forward order). This one
    slices given tensors; ``favor_causal`` computes them from log-features per tile."""

    def __init__(self, a: Tensor | None, b: Tensor, g: Tensor) -> None:
        self.a, self.b, self.g = a, b, g
        self.shape = b.shape  # (..., n, P)

    def __call__(self, index: int, sl: slice) -> tuple[Tensor | None, Tensor, Tensor]:
        return (None if self.a is None else self.a[..., sl, :]), self.b[..., sl, :], \
            self.g[..., sl, :]


def _scan(a: Tensor | None, b: Tensor, x: Tensor, g: Tensor, h: Tensor | None, chunk: int,
          s0: Tensor | None = None, r0: Tensor | None = None, reverse: bool = False):
    """The prefix sum (no autograd of its own): ``(y, z)`` with y_r = S_rᵀ a_r (None if a is
    None) and z_r = S_r h_r (None if h is None), S_r as in the module docstring.

    ``reverse``: suffix sums instead, S_s = Σ_{r ≥ s} diag(e^{g_s − g_r}) b_r x_rᵀ (the same
    scan on the time-reversed sequence with g -> −g, again non-decreasing). ``s0`` (..., P, Q):
    a state entering row 0, referenced to ``r0`` (..., Pg) <= g_0 (forward only).
    """
    return scan_rows(Rows(a, b, g), x, h, chunk, want_y=a is not None, s0=s0, r0=r0,
                     reverse=reverse)


def scan_rows(rows_of, x: Tensor, h: Tensor | None, chunk: int, *, want_y: bool = True,
              s0: Tensor | None = None, r0: Tensor | None = None, reverse: bool = False,
              swap: bool = False, times_a: bool = False, sink=None):
    """``_scan`` with a, b, g served tile by tile by ``rows_of(index, slice)``: tiles of about
    ``TILE_ELEMENTS`` feature entries (small temporaries, reused from the heap instead of
    fresh pages; reversed tile by tile), the state carried along. ``swap``: a and b trade
    places (the reverse scans of backward); ``times_a``: z_r ⊙ a_r instead of z_r.

    x and h may be any object with ``shape``, ``new_zeros`` and ``[..., rows, :]`` (rows
    computed on demand); h may also be a callable ``h(index, slice, y_rows)`` giving a tile's
    rows of h from its (final) rows of y (forward scans with ``want_y``: backward's ∂den needs
    the output it recomputes). ``sink(index, slice, y, z)``: receives each tile's rows (in order
    within the tile) instead of full outputs, and ``(None, None)`` is returned: nothing of
    size n × P is ever allocated."""
    *lead, n, p = rows_of.shape
    q = x.shape[-1]
    rows = tile_rows(tuple(lead), max(p, q), min(chunk, n))
    c = min(chunk, n, rows)  # fewer rows than the chunk: wide tiles run smaller chunks
    state = x.new_zeros(*lead, p, q) if s0 is None else s0
    ref = r0
    one = rows >= n
    y_out = None if not want_y or one or sink else x.new_empty(*lead, n, q)
    z_out = None if h is None or one or sink else x.new_empty(*lead, n, p)
    starts = list(range(0, n, rows))
    for index in reversed(range(len(starts))) if reverse else range(len(starts)):
        sl = slice(starts[index], starts[index] + rows)
        a_t, b_t, g_t = rows_of(index, sl)
        if swap:
            a_t, b_t = b_t, a_t
        a_t = a_t if want_y or times_a else None
        h_t = _cut(h, sl, False) if not callable(h) else None
        a_t, b_t, g_t, x_t, h_t = (_cut(t, slice(None), reverse) for t in (a_t, b_t, g_t,
                                                                           x[..., sl, :], h_t))
        if callable(h):  # rows of h computed from this tile's rows of y (forward scans)
            h_t = functools.partial(h, index, sl)
        if reverse:  # g -> −g: non-decreasing again (_cut's flip copied g_t: negate in place)
            g_t = g_t.neg_()
        if ref is None:
            ref = g_t[..., 0, :]
        y, z, state, ref = _tile(a_t if want_y else None, b_t, x_t, g_t, h_t, state, ref, c)
        if times_a and z is not None:
            z = z.mul_(a_t)  # z is _tile's own buffer
        y, z = _cut(y, slice(None), reverse), _cut(z, slice(None), reverse)
        if sink is not None:
            sink(index, sl, y, z)
        elif one:
            return y, z
        else:  # written in place (autograd records the copies)
            if y_out is not None:
                y_out[..., sl, :] = y
            if z_out is not None:
                z_out[..., sl, :] = z
        # this tile's rows go before the next tile's are formed (2 tiles never coexist)
        del a_t, b_t, g_t, x_t, h_t, y, z
    return y_out, z_out


def _cut(t: Tensor | None, sl: slice, reverse: bool) -> Tensor | None:
    """Rows ``sl`` of t (..., n, W), time-reversed for a reverse scan."""
    return None if t is None else t[..., sl, :].flip(-2) if reverse else t[..., sl, :]


def _chunks(t: Tensor | None, blocks: int, c: int, pad: int, replicate: bool = False):
    """(..., n, W) -> (..., N, C, W), padding the end with zeros (or the last row of g)."""
    if t is None:
        return None
    if pad:
        tail = t[..., -1:, :].expand(*t.shape[:-2], pad, t.shape[-1]) if replicate else \
            t.new_zeros(*t.shape[:-2], pad, t.shape[-1])
        t = torch.cat([t, tail], -2)
    return t.reshape(*t.shape[:-2], blocks, c, t.shape[-1])


def _pick(t: Tensor | None, idx: Tensor, c: int) -> Tensor | None:
    """Chunks ``idx`` of a (..., N, C, W) tensor, flattened to (k, C, W)."""
    return None if t is None else t.reshape(-1, c, t.shape[-1])[idx]


def _tile(a, b, x, g, h, state: Tensor, ref0: Tensor, c: int):
    """One tile of rows: ``(y, z, state after the tile, its reference)``."""
    n, p, q = b.shape[-2], b.shape[-1], x.shape[-1]
    blocks = -(-n // c)
    pad = blocks * c - n
    h_of_y = h if callable(h) else None  # h from this tile's y rows (see ``scan_rows``)
    a_, b_, x_, h_ = (_chunks(t, blocks, c, pad) for t in (a, b, x, None if h_of_y else h))
    g_ = _chunks(g, blocks, c, pad, replicate=True)  # (..., N, C, Pg)
    last = g_[..., -1:, :]  # (..., N, 1, Pg)
    ref = torch.cat([ref0[..., None, None, :], last[..., :-1, :, :]], -3)  # <= g in the chunk
    down = (ref - g_).exp_()  # e^{ref − g_r} <= 1
    floor = math.exp(-max_rise(g.dtype))
    steep = down.amin(-1) < floor  # (..., N, C): rows more than max_rise above ref
    carry = (ref - last).exp_().transpose(-2, -1)  # (..., N, Pg, 1), <= 1
    if c == 1:  # the only in-chunk term is s = r: no reference needed
        w = b_
        own = torch.matmul(b_.transpose(-2, -1), x_)  # (..., N, P, Q)
    else:
        w = b_ / down.clamp_min(floor)  # e^{g_s − ref} b_s (steep rows clamped, then redone)
        # each chunk's summary Σ_s e^{g_s − g_last} b_s x_sᵀ = diag(e^{ref − last}) Σ_s w_s x_sᵀ
        own = torch.matmul(w.transpose(-2, -1), x_) * carry
        if bool(steep.any()):  # where w was clamped: the exact factor e^{g_s − last}
            idx = steep.any(-1).flatten().nonzero().squeeze(-1)
            scale = (_pick(g_, idx, c) - last.reshape(-1, 1, g.shape[-1])[idx]).exp_()
            exact = torch.matmul((_pick(b_, idx, c) * scale).transpose(-2, -1),
                                 _pick(x_, idx, c))
            own = own.reshape(-1, p, q).index_put((idx,), exact).reshape(own.shape)
    # exclusive running sum: the state entering chunk j, referenced to ref_j
    entering = []
    for j in range(blocks):
        entering.append(state)
        state = state * carry[..., j, :, :] + own[..., j, :, :]
    states = torch.stack(entering, -3)  # (..., N, P, Q)
    del own, entering
    y = z = None
    if a_ is not None:
        u = a_ * down
        if c == 1:
            intra = (a_ * b_).sum(-1, keepdim=True) * x_
        else:
            intra = torch.matmul(torch.matmul(u, w.transpose(-2, -1)).tril_(), x_)
        y = torch.matmul(u, states).add_(intra)  # (..., N, C, Q)
        del u, intra
    if h_of_y is not None:  # y first (steep rows redone, as a y-only scan does), then h
        if c > 1:
            y = _redo_steep_rows(a_, b_, x_, g_, None, y, None, states, ref, steep, c)[0]
        h_ = _chunks(h_of_y(y.reshape(*y.shape[:-3], blocks * c, q)[..., :n, :]), blocks, c,
                     pad)
    if h_ is not None:
        z = torch.matmul(h_, states.transpose(-2, -1))  # (..., N, C, P)
        if c == 1:
            z = z.mul_(down).add_((h_ * x_).sum(-1, keepdim=True) * b_)
        else:
            z = z.add_(torch.matmul(torch.matmul(h_, x_.transpose(-2, -1)).tril_(), w)).mul_(down)
    if c > 1 and h_of_y is not None:  # y is final already: redo z alone
        z = _redo_steep_rows(None, b_, x_, g_, h_, None, z, states, ref, steep, c)[1]
    elif c > 1:
        y, z = _redo_steep_rows(a_, b_, x_, g_, h_, y, z, states, ref, steep, c)
    y = None if y is None else y.reshape(*y.shape[:-3], blocks * c, q)[..., :n, :]
    z = None if z is None else z.reshape(*z.shape[:-3], blocks * c, p)[..., :n, :]
    return y, z, state, g_[..., -1, -1, :]


def _redo_steep_rows(a_, b_, x_, g_, h_, y, z, states, ref, steep: Tensor, c: int):
    """Rows whose g rose more than ``max_rise`` above their chunk's reference: rerun their
    chunks (from the entering state) in chunks ``_SUBDIVIDE`` times smaller and take those
    rows from there. Data-dependent, hence inside the custom op (eager)."""
    if not bool(steep.any()):
        return y, z
    flat = steep.reshape(-1, c)  # (L, C)
    idx = flat.any(-1).nonzero().squeeze(-1)  # chunks to redo
    sub_y, sub_z = _scan(*(_pick(t, idx, c) for t in (a_, b_, x_, g_, h_)),
                         max(1, c // _SUBDIVIDE), s0=states.flatten(0, -3)[idx],
                         r0=ref.reshape(-1, ref.shape[-1])[idx])
    rows = flat[idx].unsqueeze(-1)  # (k, C, 1)

    def merge(full, sub):
        if full is None:
            return None
        flat_full = full.reshape(-1, c, full.shape[-1])
        fixed = torch.where(rows, sub, flat_full[idx])
        return flat_full.index_put((idx,), fixed).reshape(full.shape)

    return merge(y, sub_y), merge(z, sub_z)


def _grads(a, b, x, g, grad, chunk, need_a: bool, need_bx: bool):
    """∂a_r = S_r ∂Y_r;  ∂x_s = Σ_{r≥s} (b_s ⊙ a_r ⊙ e^{g_s−g_r})·∂Y_r and
    ∂b_s = Σ_{r≥s} (x_s·∂Y_r) a_r ⊙ e^{g_s−g_r}: one reverse scan (g carries no gradient)."""
    ga = _scan(None, b, x, g, grad, chunk)[1] if need_a else None
    gx, gb = _scan(b, a, grad, g, x, chunk, reverse=True) if need_bx else (None, None)
    return ga, gb, gx


@torch.library.custom_op("transformer_zoo::causal_linear_scan", mutates_args=())
def _scan_op(a: Tensor, b: Tensor, x: Tensor, g: Tensor, chunk: int) -> Tensor:
    return _scan(a, b, x, g, None, chunk)[0].contiguous()


@_scan_op.register_fake
def _(a, b, x, g, chunk):
    return x.new_empty(*a.shape[:-1], x.shape[-1])


@torch.library.custom_op("transformer_zoo::causal_linear_scan_backward", mutates_args=())
def _scan_backward_op(a: Tensor, b: Tensor, x: Tensor, g: Tensor, grad: Tensor, chunk: int,
                      need_a: bool, need_bx: bool) -> tuple[Tensor, Tensor, Tensor]:
    ga, gb, gx = _grads(a, b, x, g, grad, chunk, need_a, need_bx)
    empty = a.new_empty(0)
    return tuple(empty if t is None else t.contiguous() for t in (ga, gb, gx))


@_scan_backward_op.register_fake
def _(a, b, x, g, grad, chunk, need_a, need_bx):
    empty = a.new_empty(0)
    return (torch.empty_like(a) if need_a else empty, torch.empty_like(b) if need_bx else empty,
            torch.empty_like(x) if need_bx else empty)


def _setup_context(ctx, inputs, output) -> None:
    a, b, x, g, chunk = inputs
    ctx.save_for_backward(a, b, x, g)
    ctx.chunk = chunk


def _backward(ctx, grad: Tensor):
    a, b, x, g = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the eager kernel
        inputs = [t for t, n in zip((a, b, x), need, strict=True) if n]
        y = _scan(a, b, x, g, None, ctx.chunk)[0]
        found = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
        return (*(next(found) if n else None for n in need), None, None)
    ga, gb, gx = _scan_backward_op(a, b, x, g, grad.contiguous(), ctx.chunk, need[0],
                                   need[1] or need[2])
    return (ga if need[0] else None, gb if need[1] else None, gx if need[2] else None,
            None, None)


_scan_op.register_autograd(_backward, setup_context=_setup_context)


def causal_linear_scan(a: Tensor, b: Tensor, x: Tensor, g: Tensor, *, chunk: int = 128) -> Tensor:
    """``Y_r = Σ_{s≤r} Σ_p a_{r,p} b_{s,p} e^{g_{s,p} − g_{r,p}} x_s``, O(n(P+Q)) memory.

    a, b ``(..., n, P)``; x ``(..., n, Q)``; g ``(..., n, P)``, ``(..., n, 1)`` or ``(..., n)``
    (one value per row), non-decreasing along n and treated as a constant (callers use it as
    a stabiliser whose value cancels). Returns ``(..., n, Q)``. Exact to rounding when
    |a| e^{g_r} and |b| e^{−g_s} are the caller's features relative to g (each factor <= 1).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if g.ndim == a.ndim - 1:
        g = g.unsqueeze(-1)
    if b.shape != a.shape or x.shape[:-1] != a.shape[:-1] or g.shape[:-1] != a.shape[:-1] \
            or g.shape[-1] not in (1, a.shape[-1]):
        raise ValueError(
            "causal_linear_scan: expected a, b (..., n, P), x (..., n, Q) and g (..., n, P|1), "
            f"got a {tuple(a.shape)}, b {tuple(b.shape)}, x {tuple(x.shape)}, g {tuple(g.shape)}"
        )
    return _scan_op(a, b, x, g.detach(), chunk)
