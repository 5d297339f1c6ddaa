"""Bidirectional FAVOR+ / FAVOR++ with positive features, fused, with a hand-written backward.

    out = (Q' (K'ᵀ [V, 1]))[:, :d] / (Q' (K'ᵀ [V, 1]))[:, d],
    K' = exp([B K̂, |K̂|²/2] [W, −1]ᵀ − c),  c_f = max over valid keys of column f,
    Q' = exp([B Q̂, 1] [W, c + 2β]ᵀ − max_row),   x̂ = d^(−1/4) x

for any map of the form log φ(x̂) = B W x̂ + β − |x̂|²/2 (W rows already doubled for antithetic
pairs): ``PositiveFeatures`` (B = 1, β = 0), ``HyperbolicFeatures`` (W = [W, −W]) and
``OptimalPositiveFeatures`` (B = √(1 − 4A), β_f = A|ω_f|²; the key side's β cancels against its
stabilizer, so the query side carries 2β). The same function as the generic path of
``favor_attention(..., causal=False)`` (Choromanski et al. 2021, arXiv 2009.14794; Likhosherstov
et al. 2022, arXiv 2205.15317), computed with fewer passes over the
``(b, h, n, F)`` feature tensors, which on a CPU cost as much as the matmuls:

- −|k̂|²/2 rides in the key projection matmul as an extra column, and the per-feature key
  stabilizer c rides in the query projection the same way (no separate passes);
- the stabilizer subtraction and exp run in place on the matmul output;
- the ones column appended to V yields numerator and denominator from one matmul pair;
- backward reuses the saved features: ∂P = ∂φ ⊙ φ in place, ∂k̂ = ∂P_k [W, −1] with the
  first d columns times B and the last times k̂ (the |k̂|²/2 term), and no gradient flows into
  the stabilizers (they cancel exactly, so their true gradient is 0) nor into B and β
  (FAVOR++'s measured ρ is a stop-gradient on both paths).

Shapes: q ``(b, h, n, d)``, k/v ``(b, h, m, d)`` (heads already expanded), W ``(F, d)``,
valid ``(b, m)`` or None, B ``(b, h, 1, 1)`` or 0-d or None, β ``(…, F)`` or None. Exact to
rounding against the unfused path (tests compare values and gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor


class FusedFavor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, w: Tensor, valid: Tensor | None,
                b_coef: Tensor | None = None, bias: Tensor | None = None):
        d = q.shape[-1]
        scale = d**-0.25
        w_aug = torch.cat([w, w.new_full((w.shape[0], 1), -1.0)], -1)  # (F, d + 1)
        kh = k * scale  # (b, h, m, d)
        kb = kh if b_coef is None else kh * b_coef  # B k̂
        kh_aug = torch.cat([kb, kh.square().sum(-1, keepdim=True).mul_(0.5)], -1)
        kf = torch.matmul(kh_aug, w_aug.T)  # (b, h, m, F) = k̂ Wᵀ − |k̂|²/2
        if valid is not None:
            kf.masked_fill_(~valid[:, None, :, None], float("-inf"))  # padded keys: φ = 0
        c = kf.amax(-2, keepdim=True)  # (b, h, 1, F): per-feature max over valid keys
        c = torch.where(torch.isfinite(c), c, 0.0)
        kf.sub_(c).exp_()
        # queries: q̂ Wᵀ + c in one matmul, then the per-token max (the largest term of every
        # denominator is exactly exp(0)·exp(0) = 1: no underflow to 0/0)
        qb = q * scale if b_coef is None else q * scale * b_coef  # B q̂
        q_aug = torch.cat([qb, q.new_ones(*q.shape[:-1], 1)], -1)  # (b, h, n, d + 1)
        cq = c if bias is None else c + 2 * bias  # (b, h, 1, F)
        w_q = torch.cat([w.expand(*cq.shape[:2], *w.shape), cq.transpose(-2, -1)], -1)
        qf = torch.matmul(q_aug, w_q.transpose(-2, -1))  # (b, h, n, F)
        qf.sub_(qf.amax(-1, keepdim=True)).exp_()
        vp = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)  # (b, h, m, d + 1)
        kv = torch.matmul(kf.transpose(-2, -1), vp)  # (b, h, F, d + 1)
        y = torch.matmul(qf, kv)  # (b, h, n, d + 1)
        den = y[..., d:]
        inv = torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)  # (b, h, n, 1)
        out = y[..., :d] * inv
        ctx.save_for_backward(qf, kf, kh, vp, kv, inv, out, w_aug)
        ctx.scale, ctx.b_coef = scale, b_coef
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        qf, kf, kh, vp, kv, inv, out, w_aug = ctx.saved_tensors
        b_coef = 1.0 if ctx.b_coef is None else ctx.b_coef
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        d = out.shape[-1]
        dnum = grad * inv  # (b, h, n, d)
        dden = (grad * out).sum(-1, keepdim=True).mul_(inv).neg_()  # (b, h, n, 1)
        dy = torch.cat([dnum, dden], -1)  # (b, h, n, d + 1)
        dq = dk = dv = None
        if need_q:
            dpq = torch.matmul(dy, kv.transpose(-2, -1)).mul_(qf)  # (b, h, n, F)
            dq = torch.matmul(dpq, w_aug[:, :d]).mul_(ctx.scale) * b_coef  # c: no gradient
        if need_k or need_v:
            dkv = torch.matmul(qf.transpose(-2, -1), dy)  # (b, h, F, d + 1)
            if need_v:
                dv = torch.matmul(kf, dkv[..., :d])  # (b, h, m, d)
            if need_k:
                dpk = torch.matmul(vp, dkv.transpose(-2, -1)).mul_(kf)  # (b, h, m, F)
                dk_aug = torch.matmul(dpk, w_aug)  # (b, h, m, d + 1); last col −Σ_F ∂P
                dk = (dk_aug[..., :d] * b_coef + dk_aug[..., d:] * kh).mul_(ctx.scale)
        return dq, dk, dv, None, None, None, None
