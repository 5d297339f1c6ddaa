"""Bidirectional FAVOR+ / FAVOR++ with positive features: fused, tiled, recomputing backward.

    out = (Q' (K'ᵀ [V, 1]))[:, :d] / (Q' (K'ᵀ [V, 1]))[:, d],
    K' = exp([B K̂, |K̂|²/2] [W, −1]ᵀ − c),  c_f = max over valid keys of column f,
    Q' = exp([B Q̂, 1] [W, c + 2β]ᵀ − max_row),   x̂ = d^(−1/4) x

for any map of the form log φ(x̂) = B W x̂ + β − |x̂|²/2 (W rows already doubled for antithetic
pairs): ``PositiveFeatures`` (B = 1, β = 0), ``HyperbolicFeatures`` (W = [W, −W]) and
``OptimalPositiveFeatures`` (B = √(1 − 4A), β_f = A|ω_f|²; the key side's β cancels against its
stabilizer, so the query side carries 2β). The same function as the generic path of
``favor_attention(..., causal=False)`` (Choromanski et al. 2021, arXiv 2009.14794; Likhosherstov
et al. 2022, arXiv 2205.15317), computed tile by tile along the sequence so that no
``(b, h, n, F)`` feature tensor ever exists:

- keys, one tile at a time: K'ᵀ[V, 1] is accumulated with an online per-feature max (the
  running sum is rescaled by exp(c_old − c_new) when a tile raises c, as in FlashAttention's
  online softmax), so one pass gives the exact stabilizer of the whole sequence;
- −|k̂|²/2 rides in the key projection matmul as an extra column, and c rides in the query
  projection the same way; the ones column appended to V yields numerator and denominator
  from one matmul pair; stabilizer subtraction and exp run in place;
- only O(n + F·d) is saved beyond the inputs (1/den, c, K'ᵀ[V, 1]); backward recomputes
  each tile's features (two extra projection matmuls, against ten) and its rows of out (one
  F × (d_v + 1) matmul, as forward: the output itself is not held), and accumulates
  ∂(K'ᵀ[V, 1]) over query tiles before the key tiles use it. No gradient flows into the
  stabilizers (they cancel exactly, so their true gradient is 0) nor into B and β (FAVOR++'s
  measured ρ is a stop-gradient on both paths).

Tiles hold about ``TILE_ELEMENTS`` feature entries (b·h·rows·F): a few MB, so they stay in
cache and below glibc's mmap threshold (no fresh pages, hence no page faults, per step).
Problems whose feature tensors hold at most ``KEEP_ELEMENTS`` entries (and every problem under
torch.compile) run as one tile and keep their features for backward instead.

Shapes: q ``(b, h, n, d)``, k/v ``(b, h, m, d)`` (heads already expanded), W ``(F, d)``,
valid ``(b, m)`` or None, B ``(b, h, 1, 1)`` or 0-d or None, β ``(…, F)`` or None. Exact to
rounding against the unfused path (tests compare values and gradients, with several tiles).
Gradients flow to q, k, v only (``favor_attention`` takes the generic path for a W that
requires grad). Under ``create_graph=True`` backward differentiates ``_reference`` (the same
function written with plain autograd ops, untiled), so higher-order gradients are exact too.
"""

from __future__ import annotations

import torch
from torch import Tensor

TILE_ELEMENTS = 1 << 20  # feature entries per tile (4 MiB in fp32)
KEEP_ELEMENTS = 1 << 22  # up to this many per feature tensor: one tile, features saved


def _tiled(q: Tensor, k: Tensor, f: int) -> bool:
    """Tile (and recompute in backward) only when a feature tensor would be large.

    Small problems run as one tile and save their features (recomputing them would add two
    projection matmuls to ten for nothing). Under torch.compile: one tile too, since a Python
    loop over a symbolic length would specialize the graph on every new length."""
    if torch.compiler.is_compiling():
        return False
    return q.shape[0] * q.shape[1] * max(q.shape[-2], k.shape[-2]) * f > KEEP_ELEMENTS


def _offsets_outside_matmuls() -> bool:
    """Whether the large offsets (|k̂|²/2, c + 2β) must skip the matmuls: when fp32 matmuls may
    round their inputs (TF32/bf16 under reduced matmul precision), and under torch.compile,
    where the compiler fuses the separate add anyway (and the precision query cannot be
    traced)."""
    return torch.compiler.is_compiling() or torch.get_float32_matmul_precision() != "highest"


def _tiles(x: Tensor, f: int, tiled: bool) -> list[slice]:
    """Row slices along dim −2 of x (b, h, n, ·) holding about TILE_ELEMENTS features each."""
    if not tiled:
        return [slice(None)]
    rows = max(16, TILE_ELEMENTS // max(1, x.shape[0] * x.shape[1] * f))
    return [slice(s, s + rows) for s in range(0, x.shape[-2], rows)]


def _key_logits(kh: Tensor, w_aug: Tensor, b_coef, valid: Tensor | None,
                exact: bool) -> Tensor:
    """[B k̂, |k̂|²/2] [W, −1]ᵀ for one tile of keys, −inf at padded keys: (b, h, r, F).

    ``exact``: add −|k̂|²/2 after the matmul instead of as an extra column, for matmuls that
    round their inputs (TF32 or bf16 under ``torch.set_float32_matmul_precision("high")``):
    a large offset rounded to a 10-bit mantissa would change every feature by a factor."""
    kb = kh if b_coef is None else kh * b_coef
    half_sq = kh.square().sum(-1, keepdim=True).mul_(0.5)  # (b, h, r, 1)
    if exact:
        kl = torch.matmul(kb, w_aug[:, :-1].T).sub_(half_sq)
    else:
        kl = torch.matmul(torch.cat([kb, half_sq], -1), w_aug.T)
    if valid is not None:
        kl.masked_fill_(~valid[:, None, :, None], float("-inf"))  # padded keys: φ = 0
    return kl


def _query_logits(q: Tensor, w_q: Tensor, scale: float, b_coef, exact: bool) -> Tensor:
    """[B q̂, 1] [W, c + 2β]ᵀ for one tile of queries: (b, h, r, F). ``exact``: c + 2β added
    after the matmul (see ``_key_logits``)."""
    qb = q * scale if b_coef is None else q * scale * b_coef
    if exact:
        return torch.matmul(qb, w_q[..., :-1].transpose(-2, -1)).add_(w_q[..., -1].unsqueeze(-2))
    return torch.matmul(_with_ones(qb), w_q.transpose(-2, -1))


def _query_features(q: Tensor, w_q: Tensor, scale: float, b_coef, exact: bool) -> Tensor:
    """exp(query logits − max_row): the per-token max makes the largest term of every
    denominator exactly exp(0)·exp(0) = 1, so no underflow to 0/0."""
    ql = _query_logits(q, w_q, scale, b_coef, exact)
    return ql.sub_(ql.amax(-1, keepdim=True)).exp_()


def _with_ones(x: Tensor) -> Tensor:
    """[x, 1] along the last dim: the ones column that turns a numerator into a denominator."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def _safe_inverse(den: Tensor) -> Tensor:
    """1 / den where den > 0, else 0 (no valid key: the output is 0, never NaN)."""
    return torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)


def _reference(q: Tensor, k: Tensor, v: Tensor, w_aug: Tensor, w_q: Tensor, c: Tensor,
               valid: Tensor | None, b_coef, scale: float, exact: bool) -> Tensor:
    """The same output with differentiable ops, untiled, with the forward's stabilizers
    (constants: they cancel): what backward differentiates when a graph of the gradient is
    requested."""
    kf = (_key_logits(k * scale, w_aug, b_coef, valid, exact) - c).exp()
    ql = _query_logits(q, w_q, scale, b_coef, exact)
    qf = (ql - ql.detach().amax(-1, keepdim=True)).exp()
    y = torch.matmul(qf, torch.matmul(kf.transpose(-2, -1), _with_ones(v)))
    return y[..., :-1] * _safe_inverse(y[..., -1:])


class FusedFavor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, w: Tensor, valid: Tensor | None,
                b_coef: Tensor | None = None, bias: Tensor | None = None):
        d, f = q.shape[-1], w.shape[0]
        scale = d**-0.25
        w_aug = torch.cat([w, w.new_full((f, 1), -1.0)], -1)  # (F, d + 1)
        kv = q.new_zeros(*k.shape[:2], f, v.shape[-1] + 1)  # Σ_j φ(k_j) [v_j, 1], running max
        c = q.new_full((*k.shape[:2], 1, f), float("-inf"))  # running max (b, h, 1, F)
        tiled = _tiled(q, k, f)
        exact = _offsets_outside_matmuls()
        kl = qf = None
        for t in _tiles(k, f, tiled):
            kl = None  # the previous tile's features go before this tile's are formed
            kl = _key_logits(k[:, :, t] * scale, w_aug, b_coef,
                             None if valid is None else valid[:, t], exact)
            c_new = torch.maximum(c, kl.amax(-2, keepdim=True))
            c_sub = torch.where(torch.isfinite(c_new), c_new, 0.0)
            kv.mul_(torch.where(torch.isfinite(c), (c - c_sub).exp(), 0.0).transpose(-2, -1))
            kv.add_(torch.matmul(kl.sub_(c_sub).exp_().transpose(-2, -1), _with_ones(v[:, :, t])))
            c = c_new
        c = torch.where(torch.isfinite(c), c, 0.0)  # no valid key at all: kv = 0, out = 0
        cq = c if bias is None else c + 2 * bias  # (b, h, 1, F)
        w_q = torch.cat([w.expand(*cq.shape[:2], *w.shape), cq.transpose(-2, -1)], -1)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (b, h, n, d_v)
        inv = q.new_empty(*q.shape[:-1], 1)  # 1 / denominator, 0 where it is 0
        for t in _tiles(q, f, tiled):
            qf = None
            qf = _query_features(q[:, :, t], w_q, scale, b_coef, exact)
            y = torch.matmul(qf, kv)
            inv_t = _safe_inverse(y[..., -1:])
            inv[:, :, t] = inv_t
            out[:, :, t] = y[..., :-1] * inv_t
            del y, inv_t
        kept = (None, None) if tiled else (qf, kl)  # one tile: kl holds the final K' already
        del qf, kl
        # out is not saved: backward recomputes each tile's rows from its φ(q) (one small
        # matmul), so the output's n·d_v entries are not held for backward (the module's
        # head merge copies it anyway)
        ctx.save_for_backward(q, k, v, valid, w_aug, w_q, kv, c, inv, *kept)
        ctx.scale, ctx.b_coef, ctx.tiled, ctx.exact = scale, b_coef, tiled, exact
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, valid, w_aug, w_q, kv, c, inv, qf_kept, kf_kept = ctx.saved_tensors
        scale, b_coef, tiled, exact = ctx.scale, ctx.b_coef, ctx.tiled, ctx.exact
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            inputs = [x for x, need in zip((q, k, v), ctx.needs_input_grad[:3], strict=True)
                      if need]
            with torch.enable_grad():
                ref = _reference(q, k, v, w_aug, w_q, c, valid, b_coef, scale, exact)
                found = iter(torch.autograd.grad(ref, inputs, grad, create_graph=True))
            return (*(next(found) if need else None for need in ctx.needs_input_grad[:3]),
                    None, None, None, None)
        b_mul = 1.0 if b_coef is None else b_coef
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        d, f = q.shape[-1], w_aug.shape[0]
        dq = torch.empty_like(q) if need_q else None
        dkv = kv.new_zeros(kv.shape)  # ∂L/∂(K'ᵀ[V, 1]), (b, h, F, d_v + 1)
        # tile temporaries are dropped at the end of each tile (del), so a tile's features
        # never coexist with the next tile's, nor the query loop's with the key loop's
        for t in _tiles(q, f, tiled):
            inv_t, g = inv[:, :, t], grad[:, :, t]
            qf = qf_kept if qf_kept is not None else _query_features(q[:, :, t], w_q, scale,
                                                                     b_coef, exact)
            out_t = torch.matmul(qf, kv)[..., :-1] * inv_t  # the forward's rows of out, as
            # forward computes them (same ops, same rounding)
            dden = (g * out_t).sum(-1, keepdim=True).mul_(inv_t).neg_()  # (b, h, r, 1)
            del out_t
            dy = torch.cat([g * inv_t, dden], -1)  # (b, h, r, d_v + 1)
            if need_k or need_v:
                dkv.add_(torch.matmul(qf.transpose(-2, -1), dy))
            if need_q:
                dpq = torch.matmul(dy, kv.transpose(-2, -1)).mul_(qf)  # (b, h, r, F)
                del qf, dy
                dq[:, :, t] = torch.matmul(dpq, w_aug[:, :d]).mul_(scale) * b_mul
                del dpq
            else:
                del qf, dy
        del qf_kept
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        if need_k or need_v:
            for t in _tiles(k, f, tiled):
                kh = k[:, :, t] * scale
                if kf_kept is not None:
                    kf = kf_kept
                else:  # recomputed features, exactly as in forward
                    kf = _key_logits(kh, w_aug, b_coef,
                                     None if valid is None else valid[:, t], exact)
                    kf.sub_(c).exp_()
                if need_v:
                    dv[:, :, t] = torch.matmul(kf, dkv[..., :-1])
                if need_k:
                    dpk = torch.matmul(_with_ones(v[:, :, t]), dkv.transpose(-2, -1)).mul_(kf)
                    del kf
                    dk_aug = torch.matmul(dpk, w_aug)  # (b, h, r, d + 1); last col −Σ_F ∂P
                    del dpk
                    dk[:, :, t] = (dk_aug[..., :d] * b_mul + dk_aug[..., d:] * kh).mul_(scale)
                    del dk_aug
                else:
                    del kf
                del kh
        return dq, dk, dv, None, None, None, None
