"""Bidirectional FAVOR for any row-wise feature map, tiled, with a recomputing backward.

    out = (Q' (K'ᵀ [V, 1]))[:, :d] / (Q' (K'ᵀ [V, 1]))[:, d],   x̂ = d^(−1/4) x
    exponential maps:  K' = exp(log φ(K̂) − c),  Q' = exp(log φ(Q̂) + c − max_row),
                       c_f = max of log φ(k̂)_f over valid keys
    plain maps:        K' = φ(K̂) (0 at padded keys),  Q' = φ(Q̂)

The function of ``favor_attention(..., causal=False)``'s generic path (``favor_features`` in
``favor.py``; Choromanski et al. 2021, arXiv 2009.14794) for every map that answers
``FeatureMap.tile_parameters()`` — the learnable maps (Hedgehog, arXiv 2402.04347; T2R,
arXiv 2103.13076; learned-W FAVOR+) and any user map that names its tensors — computed tile
by tile along the sequence, so that no ``(b, h, n, F)`` feature tensor is kept:

- forward: per tile of keys, the map's features and K'ᵀ[V, 1], accumulated with an online
  per-feature max (rescaled by exp(c_old − c_new) when a tile raises c, as in
  ``favor_fused.py``); per tile of queries, the rows of out and 1/den;
- saved: q, k, v, the mask, the map's tensors, K'ᵀ[V, 1], c and 1/den (O(n + F·d) beyond the
  inputs; not the output);
- backward: per tile, the map recomputes its features under autograd (on detached stand-ins
  of the tile's rows and of its tensors, ``FeatureMap.features_with``); ∂log φ = Q' ⊙ ∂Q'
  (exponential) or ∂φ (plain) is pulled back through that tile's graph with
  ``torch.autograd.grad``, giving the tile's rows of ∂q or ∂k and adding to the tensors'
  gradients. Exact: the stabilizers (c, the per-query max) get no gradient, as on the
  generic path (they cancel). ``create_graph=True`` differentiates ``_reference`` (the same
  function with plain autograd ops, untiled), so higher-order gradients are exact too.

Shapes: q ``(b, h, n, d)``, k/v ``(b, h, m, d)`` (heads already expanded), valid ``(b, m)``
bool or None (True = real key), W the kernel's random ``(r, d)`` (read only by maps that use
it), the map's tensors as ``tile_parameters()`` returns them -> out ``(b, h, n, d_v)``.
Exact to rounding against the generic path (tests: values and every gradient, fp64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from transformer_zoo.functional.favor_causal import stabilized_query
from transformer_zoo.functional.feature_maps import FeatureMap

TILE_ELEMENTS = 1 << 17  # feature entries per tile (512 KiB in fp32; 1 << 18 was no faster)
# Up to this many per feature tensor (2 MiB fp32) favor.py keeps the generic path. Above it
# the tiled path was as fast (MiniLM's 12 heads x 64 features, n = 256-4096, 1 thread:
# forward 0.73-1.02x, forward+backward 0.95-1.13x the generic path) at ~2.5x less memory.
KEEP_ELEMENTS = 1 << 19


def worth_tiling(q: Tensor, k: Tensor, f: int) -> bool:
    """Tile only when a feature tensor would be large (and never under torch.compile, where
    a Python loop over a symbolic length would specialise the graph on every length)."""
    if torch.compiler.is_compiling():
        return False
    return q.shape[0] * q.shape[1] * max(q.shape[-2], k.shape[-2]) * f > KEEP_ELEMENTS


def _tiles(x: Tensor, f: int) -> list[slice]:
    rows = max(1, TILE_ELEMENTS // max(1, x.shape[0] * x.shape[1] * f))
    return [slice(s, s + rows) for s in range(0, x.shape[-2], rows)]


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def _safe_inverse(den: Tensor) -> Tensor:
    """1 / den where den > 0, else 0 (no key, or every feature underflowed): never NaN."""
    return torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)


class MapTiles:
    """One call's feature map as the tiled kernels use it: rows of x -> (log-)features, and
    the pull-back of ∂(log-)features to those rows and to the map's tensors."""

    def __init__(self, fm: FeatureMap, w: Tensor, params: tuple[Tensor, ...],
                 need: tuple[bool, ...] | None = None) -> None:
        self.fm, self.w, self.params = fm, w, params
        self.exponential = fm.exponential
        self.need = tuple(need) if need is not None else (False,) * len(params)
        self.grads: list[Tensor | None] = [None] * len(params)

    def logits(self, x_hat: Tensor, *, query: bool, valid: Tensor | None = None,
               params: tuple[Tensor, ...] | None = None) -> Tensor:
        """log φ (exponential maps) or φ of rows x̂ ``(b, h, r, d)``; padded keys (``valid``
        ``(b, r)`` False) enter as 0 (any content, even inf, stays out) and leave as φ = 0."""
        keep = None if valid is None else valid[:, None, :, None]
        if keep is not None:
            x_hat = x_hat.masked_fill(~keep, 0.0)
        out = self.fm.features_with(self.params if params is None else params, x_hat, self.w,
                                    query=query)
        if keep is not None:
            out = out.masked_fill(~keep, float("-inf") if self.exponential else 0.0)
        return out

    def traced(self, x: Tensor, scale: float, *, query: bool, valid: Tensor | None = None,
               need_x: bool) -> tuple[Tensor, Callable[[Tensor], Tensor | None] | None]:
        """``(features of rows x, pull)``: ``pull(dl)`` returns ∂x (None unless ``need_x``)
        for ∂L/∂(log-)features = dl and adds the tensors' gradients to ``grads``. The tile's
        graph lives until pull is called (one tile at a time)."""
        if not (need_x or any(self.need)):
            return self.logits(x * scale, query=query, valid=valid), None
        leaves = tuple(p.detach().requires_grad_(n) for p, n in zip(self.params, self.need,
                                                                     strict=True))
        xl = x.detach().requires_grad_(need_x)
        with torch.enable_grad():
            out = self.logits(xl * scale, query=query, valid=valid, params=leaves)
        wanted = ([xl] if need_x else []) + [t for t, n in zip(leaves, self.need, strict=True)
                                             if n]

        def pull(dl: Tensor) -> Tensor | None:
            got = list(torch.autograd.grad(out, wanted, dl, allow_unused=True)) \
                if out.requires_grad else [None] * len(wanted)
            dx = got.pop(0) if need_x else None
            for i, n in enumerate(self.need):
                if n:
                    g = got.pop(0)
                    if g is not None:
                        self.grads[i] = g if self.grads[i] is None else self.grads[i].add_(g)
            return torch.zeros_like(x) if need_x and dx is None else dx

        return out.detach(), pull

    def param_grads(self) -> list[Tensor | None]:
        return [torch.zeros_like(p) if n and g is None else g
                for p, g, n in zip(self.params, self.grads, self.need, strict=True)]


def _reference(maps: MapTiles, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None,
               params: tuple[Tensor, ...]) -> Tensor:
    """The same output with differentiable ops, untiled, the stabilizers constants."""
    scale = q.shape[-1] ** -0.25
    lq = maps.logits(q * scale, query=True, params=params)
    lk = maps.logits(k * scale, query=False, valid=valid, params=params)
    if maps.exponential:
        c = lk.detach().amax(-2, keepdim=True)
        c = torch.where(torch.isfinite(c), c, 0.0)
        lq, lk = stabilized_query(lq, c), (lk - c).exp()
    y = torch.matmul(lq, torch.matmul(lk.transpose(-2, -1), _with_ones(v)))
    return y[..., :-1] * _safe_inverse(y[..., -1:])


class TiledFavor(torch.autograd.Function):
    """``TiledFavor.apply(fm, w, f, q, k, v, valid, *fm.tile_parameters())``: see the module
    docstring (f = the map's feature count)."""

    @staticmethod
    def forward(ctx, fm: FeatureMap, w: Tensor, f: int, q: Tensor, k: Tensor, v: Tensor,
                valid: Tensor | None, *params: Tensor) -> Tensor:
        maps = MapTiles(fm, w, params)
        scale = q.shape[-1] ** -0.25
        kv = q.new_zeros(*k.shape[:2], f, v.shape[-1] + 1)  # Σ_j K'_j [v_j, 1]
        c = q.new_full((*k.shape[:2], 1, f), float("-inf")) if maps.exponential else None
        for t in _tiles(k, f):
            lk = maps.logits(k[:, :, t] * scale, query=False,
                             valid=None if valid is None else valid[:, t])
            if c is not None:  # online per-feature max over valid keys
                c_new = torch.maximum(c, lk.amax(-2, keepdim=True))
                c_sub = torch.where(torch.isfinite(c_new), c_new, 0.0)
                kv.mul_(torch.where(torch.isfinite(c), (c - c_sub).exp(), 0.0).transpose(-2, -1))
                lk = (lk - c_sub).exp_()
                c = c_new
            kv.add_(torch.matmul(lk.transpose(-2, -1), _with_ones(v[:, :, t])))
            del lk
        if c is not None:
            c = torch.where(torch.isfinite(c), c, 0.0)  # no valid key: kv = 0, out = 0
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        inv = q.new_empty(*q.shape[:-1], 1)
        for t in _tiles(q, f):
            qf = maps.logits(q[:, :, t] * scale, query=True)
            qf = qf if c is None else stabilized_query(qf, c)
            y = torch.matmul(qf, kv)
            inv[:, :, t] = inv_t = _safe_inverse(y[..., -1:])
            out[:, :, t] = y[..., :-1] * inv_t
            del qf, y
        ctx.save_for_backward(q, k, v, valid, kv, c, inv, *params)
        ctx.fm, ctx.w, ctx.f = fm, w, f
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, valid, kv, c, inv, *params = ctx.saved_tensors
        need_q, need_k, need_v, _, *need_p = ctx.needs_input_grad[3:]
        maps = MapTiles(ctx.fm, ctx.w, tuple(params), tuple(need_p))
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            inputs = (q, k, v, *params)
            needs = (need_q, need_k, need_v, *need_p)
            wanted = [x for x, n in zip(inputs, needs, strict=True) if n]
            with torch.enable_grad():
                ref = _reference(maps, q, k, v, valid, tuple(params))
                found = iter(torch.autograd.grad(ref, wanted, grad, create_graph=True,
                                                 allow_unused=True))
            got = [next(found) if n else None for n in needs]
            return (None, None, None, *got[:3], None, *got[3:])
        scale, f = q.shape[-1] ** -0.25, ctx.f
        keys_needed = need_k or need_v or any(need_p)
        dkv = torch.zeros_like(kv)  # ∂L/∂(K'ᵀ[V, 1])
        dq = torch.empty_like(q) if need_q else None
        for t in _tiles(q, f):  # queries: ∂(K'ᵀ[V, 1]) and the pull-back through φ(q)
            lq, pull = maps.traced(q[:, :, t], scale, query=True, need_x=need_q)
            qf = lq if c is None else stabilized_query(lq, c)
            inv_t, g = inv[:, :, t], grad[:, :, t]
            out_t = torch.matmul(qf, kv)[..., :-1] * inv_t  # the forward's rows of out
            dy = torch.cat([g * inv_t, (g * out_t).sum(-1, keepdim=True).mul_(inv_t).neg_()], -1)
            if keys_needed:
                dkv.add_(torch.matmul(qf.transpose(-2, -1), dy))
            if pull is not None:
                dqf = torch.matmul(dy, kv.transpose(-2, -1))  # (b, h, r, F)
                dx = pull(dqf if c is None else dqf.mul_(qf))
                if dq is not None:
                    dq[:, :, t] = dx
            del lq, qf, out_t, dy, pull
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        if keys_needed:
            for t in _tiles(k, f):  # keys: ∂v and the pull-back through φ(k)
                lk, pull = maps.traced(k[:, :, t], scale, query=False, need_x=need_k,
                                       valid=None if valid is None else valid[:, t])
                kf = lk if c is None else (lk - c).exp_()
                if dv is not None:
                    dv[:, :, t] = torch.matmul(kf, dkv[..., :-1])
                if pull is not None:
                    dkf = torch.matmul(_with_ones(v[:, :, t]), dkv.transpose(-2, -1))
                    dx = pull(dkf if c is None else dkf.mul_(kf))
                    if dk is not None:
                        dk[:, :, t] = dx
                del lk, kf, pull
        return (None, None, None, dq, dk, dv, None, *maps.param_grads())


def tiled_favor(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, feature_map: FeatureMap,
                key_padding_mask: Tensor | None = None) -> Tensor:
    """Bidirectional FAVOR ``(b, h, n, d_v)`` for a map that answers ``tile_parameters()``
    (heads expanded, q/k/v in the compute dtype, the map prepared; see the module docstring)."""
    params = feature_map.tile_parameters()
    if params is None:
        raise ValueError(f"tiled_favor: {type(feature_map).__name__}.tile_parameters() is None "
                         "(the map does not name its tensors); use favor_attention")
    f = feature_map.num_features(w.shape[0])
    return TiledFavor.apply(feature_map, w, f, q, k, v, key_padding_mask, *params)
