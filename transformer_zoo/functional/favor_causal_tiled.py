"""Causal FAVOR for any row-wise feature map, tiled end to end: no (b, h, n, F) tensor kept.

    exponential maps:  g_j = max_{i ≤ j} log φ(k̂_i) (per feature),  φ̃(k_j) = e^{log φ(k̂_j) − g_j},
                       φ̃(q_j) = e^{log φ(q̂_j) + g_j − max_f(·)}
    plain maps:        g = 0,  φ̃ = φ (0 at padded keys)
    [num_j, den_j] = Σ_{i≤j} φ̃(q_j)ᵀ diag(e^{g_i − g_j}) φ̃(k_i) [v_i, 1],  out_j = num_j / den_j

Causal FAVOR as a prefix sum (Choromanski et al. 2021, arXiv 2009.14794, section 2.6): the
function of ``favor_attention(..., causal=True)``'s generic paths (``favor_causal.py`` for
exponential maps, ``causal_linear_scan`` with g = 0 for plain ones; the same stabilisers:
per-feature running key max, no future key in a past output) for every map that answers
``FeatureMap.tile_parameters()`` (Hedgehog, T2R, learned-W FAVOR+, user maps naming their
tensors). As ``favor_causal_fused.py`` does for affine maps, the features are formed *inside*
the scan (``causal_linear.scan_rows``) one tile of rows at a time, here by the map itself:

- forward: per tile, the map's log-features of q and k, g (running max carried from tile to
  tile), φ̃(q), φ̃(k), the scan's chunks; each tile's rows of out and 1/den are written;
- saved: q, k, v, the mask, the map's tensors and 1/den (nothing of size n·F, not the output);
- backward: the forward scan (∂φ̃(q), recomputing each tile's [num, den], hence
  ∂den = −(∂out · out)/den) and one reverse scan (∂φ̃(k), ∂v) recompute each tile's features,
  the side being differentiated under autograd (``MapTiles.traced``); ∂log φ = φ̃ ⊙ ∂φ̃
  (exponential) or ∂φ (plain) is pulled back through the tile's graph to its rows of q or k
  and to the map's tensors. No gradient flows into g nor the per-query max (they cancel).

``create_graph=True`` differentiates ``_reference`` (the same function with plain autograd
ops, untiled). Shapes: q, k ``(b, h, n, d)`` row-aligned (query j sees keys <= j), v
``(b, h, n, d_v)``, valid None / ``(b, n)`` bool (True = real key) -> out ``(b, h, n, d_v)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo.functional.causal_linear import _scan, scan_rows, tile_rows
from transformer_zoo.functional.favor_causal import cummax_rows, stabilized_query
from transformer_zoo.functional.favor_causal_rows import OnesColumn, OutputGrad, ratio_rows
from transformer_zoo.functional.favor_tiled import MapTiles, _safe_inverse
from transformer_zoo.functional.feature_maps import FeatureMap


class _MapRows:
    """(φ̃(q), φ̃(k), g) of a tile of rows from the map (the ``Rows`` of ``scan_rows``).
    ``trace`` ("query" / "key"): that side is computed under autograd and its pull-back kept
    in ``pull`` for the scan's sink (one tile at a time)."""

    def __init__(self, maps: MapTiles, q: Tensor, k: Tensor, valid: Tensor | None,
                 chunk: int, width: int, f: int) -> None:
        self.maps, self.q, self.k, self.valid = maps, q, k, valid
        self.scale = q.shape[-1] ** -0.25
        n = q.shape[-2]
        self.shape = (*q.shape[:-2], n, f)
        rows = tile_rows(tuple(q.shape[:-2]), max(f, width), min(chunk, n))  # as scan_rows
        self.tiles = [slice(s, s + rows) for s in range(0, n, rows)]
        self.starts = [q.new_full((*q.shape[:-2], 1, f), float("-inf"))]
        self.trace: str | None = None
        self.need_x = False
        self.pull = None
        self.first = None  # log φ of each sample's first real key, where some start padded
        if maps.exponential and valid is not None and not bool(valid[:, 0].all()):
            pos = valid.to(torch.int8).argmax(-1)  # (b,), 0 for a sample without a key
            idx = pos[:, None, None, None].expand(*k.shape[:-2], 1, k.shape[-1])
            first = maps.logits(k.gather(-2, idx) * self.scale, query=False)
            self.first = torch.where(valid.any(-1)[:, None, None, None], first, 0.0)

    def _side(self, x: Tensor, sl: slice, query: bool) -> Tensor:
        valid = None if query or self.valid is None else self.valid[:, sl]
        if self.trace == ("query" if query else "key"):
            out, self.pull = self.maps.traced(x[..., sl, :], self.scale, query=query,
                                              valid=valid, need_x=self.need_x)
            return out
        return self.maps.logits(x[..., sl, :] * self.scale, query=query, valid=valid)

    def _start(self, index: int, lk: Tensor | None = None) -> Tensor:
        while len(self.starts) <= index:  # a reverse scan came first: one pass over the keys
            i = len(self.starts) - 1
            lk_i = self.maps.logits(self.k[..., self.tiles[i], :] * self.scale, query=False,
                                    valid=None if self.valid is None else
                                    self.valid[:, self.tiles[i]])
            self.starts.append(torch.maximum(self.starts[i], lk_i.amax(-2, keepdim=True)))
        if lk is not None and len(self.starts) == index + 1 < len(self.tiles):
            self.starts.append(torch.maximum(self.starts[index], lk.amax(-2, keepdim=True)))
        return self.starts[index]

    def __call__(self, index: int, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
        lk = self._side(self.k, sl, query=False)
        lq = self._side(self.q, sl, query=True)
        if not self.maps.exponential:
            return lq, lk, lq.new_zeros(*lq.shape[:-1], 1)
        g = torch.maximum(cummax_rows(lk), self._start(index, lk))
        if self.first is not None:
            g = torch.where(torch.isfinite(g), g, self.first)
        return stabilized_query(lq, g), (lk - g).exp_(), g


def _gradients(maps: MapTiles, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None,
               inv: Tensor, grad: Tensor, chunk: int, f: int,
               need: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
    """∂q (forward scan), ∂k and ∂v (one reverse scan), the map's tensors' from both."""
    need_q, need_k, need_v = need
    params = any(maps.need)
    rows = _MapRows(maps, q, k, valid, chunk, v.shape[-1] + 1, f)
    times_a = maps.exponential  # ∂log φ = φ̃ ⊙ ∂φ̃; plain maps: ∂φ itself
    dy, x = OutputGrad(grad, inv), OnesColumn(v)
    dq = torch.empty_like(q) if need_q else None
    if need_q or params:
        rows.trace, rows.need_x = "query", need_q

        def query_sink(index: int, sl: slice, y, dl: Tensor) -> None:
            dx, rows.pull = rows.pull(dl), None
            if dq is not None:
                dq[..., sl, :] = dx

        scan_rows(rows, x, dy.h_rows, chunk, want_y=True, times_a=times_a, sink=query_sink)
    elif need_k or need_v:  # ∂den alone, for the reverse scan
        scan_rows(rows, x, None, chunk, sink=lambda index, sl, y, z: dy.h_rows(index, sl, y))
    dk = torch.empty_like(k) if need_k else None
    dv = torch.empty_like(v) if need_v else None
    if need_k or need_v or params:
        rows.trace, rows.need_x = "key", need_k

        def key_sink(index: int, sl: slice, y: Tensor | None, dl: Tensor) -> None:
            if dv is not None:
                dv[..., sl, :] = y[..., :-1]
            dx, rows.pull = (None if rows.pull is None else rows.pull(dl)), None
            if dk is not None:
                dk[..., sl, :] = dx

        scan_rows(rows, dy, x, chunk, want_y=need_v, reverse=True, swap=True, times_a=times_a,
                  sink=key_sink)
    return dq, dk, dv


def _reference(maps: MapTiles, q, k, v, valid, params, chunk: int, f: int) -> Tensor:
    """The same output with differentiable ops, untiled (what double backward differentiates);
    g and the per-query max are constants, as in the kernel."""
    scale = q.shape[-1] ** -0.25
    lq = maps.logits(q * scale, query=True, params=params)
    lk = maps.logits(k * scale, query=False, valid=valid, params=params)
    if maps.exponential:
        rows = _MapRows(maps, q.detach(), k.detach(), valid, chunk, v.shape[-1] + 1, f)
        g = torch.cat([rows(i, sl)[2] for i, sl in enumerate(rows.tiles)], -2)  # constants
        lq, lk = stabilized_query(lq, g), (lk - g).exp()
    else:
        g = lq.new_zeros(*lq.shape[:-1], 1)
    y = _scan(lq, lk, torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1), g, None, chunk)[0]
    return ratio_rows(y)


class TiledCausalFavor(torch.autograd.Function):
    """``TiledCausalFavor.apply(fm, w, f, chunk, q, k, v, valid, *fm.tile_parameters())``."""

    @staticmethod
    def forward(ctx, fm: FeatureMap, w: Tensor, f: int, chunk: int, q: Tensor, k: Tensor,
                v: Tensor, valid: Tensor | None, *params: Tensor) -> Tensor:
        maps = MapTiles(fm, w, params)
        rows = _MapRows(maps, q, k, valid, chunk, v.shape[-1] + 1, f)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        inv = q.new_empty(*q.shape[:-1], 1)

        def sink(index: int, sl: slice, y: Tensor, z) -> None:
            out[..., sl, :] = ratio_rows(y)
            inv[..., sl, :] = _safe_inverse(y[..., -1:])

        scan_rows(rows, OnesColumn(v), None, chunk, sink=sink)
        ctx.save_for_backward(q, k, v, valid, inv, *params)
        ctx.fm, ctx.w, ctx.f, ctx.chunk = fm, w, f, chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, valid, inv, *params = ctx.saved_tensors
        need_q, need_k, need_v, _, *need_p = ctx.needs_input_grad[4:]
        maps = MapTiles(ctx.fm, ctx.w, tuple(params), tuple(need_p))
        if torch.is_grad_enabled():  # create_graph=True: differentiate the same function
            needs = (need_q, need_k, need_v, *need_p)
            wanted = [x for x, n in zip((q, k, v, *params), needs, strict=True) if n]
            ref = _reference(maps, q, k, v, valid, tuple(params), ctx.chunk, ctx.f)
            found = iter(torch.autograd.grad(ref, wanted, grad, create_graph=True,
                                             allow_unused=True))
            got = [next(found) if n else None for n in needs]
            return (None, None, None, None, *got[:3], None, *got[3:])
        dq, dk, dv = _gradients(maps, q, k, v, valid, inv, grad, ctx.chunk,
                                ctx.f, (need_q, need_k, need_v))
        return (None, None, None, None, dq, dk, dv, None, *maps.param_grads())


def causal_tiled_favor(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, feature_map: FeatureMap,
                       valid: Tensor | None = None, chunk: int = 128) -> Tensor:
    """Causal FAVOR ``(b, h, n, d_v)``, q/k/v row-aligned, for a map that answers
    ``tile_parameters()`` (see the module docstring)."""
    params = feature_map.tile_parameters()
    if params is None:
        raise ValueError(f"causal_tiled_favor: {type(feature_map).__name__}.tile_parameters() "
                         "is None (the map does not name its tensors); use favor_attention")
    f = feature_map.num_features(w.shape[0])
    return TiledCausalFavor.apply(feature_map, w, f, chunk, q, k, v, valid, *params)
