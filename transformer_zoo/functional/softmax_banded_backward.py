"""The band kernel's backward (``functional.softmax_banded``): per block, the fused backward
of each far part with the merged O and L, the band's explicit dS pulled through its bias
rows, and the far terms' gradients (Σ_j dS_ij, Σ_i dS_ij) pulled through their graphs once.
Shapes as there."""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo.functional.softmax_banded_parts import (
    Aug,
    BandPlan,
    band_bias,
    band_mask,
    far_parts,
    far_value,
    widen,
)
from transformer_zoo.functional.softmax_blockwise_lse import _FLASH_CPU_BWD, sum_to


def banded_backward(plan: BandPlan, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              u_left: Tensor | None, w_left: Tensor | None, grad_out: Tensor,
              leaves: list[Tensor], need: tuple[bool, ...]) -> tuple:
    aug = Aug(plan, k, v)
    b, h, n, d = q.shape
    dv_ = v.shape[-1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    sides = {"left": plan.far.left, "right": plan.far.right}
    g_terms: dict[tuple[str, str], Tensor] = {}
    g_leaves: list[Tensor | None] = [None] * len(leaves)
    # the band's per-call tables (``BandRows``): their gradients summed over the blocks,
    # then pulled through the tables' graphs once, with the far terms'
    tables = [t for t in plan.tables if t.requires_grad]
    g_tables: list[Tensor | None] = [None] * len(tables)
    sizes = {"row": (b, h, n), "key": (b, h, plan.m), "value": (b, h, 1, dv_)}

    def add_term(name: str, term: str, g: Tensor, index: tuple) -> None:
        if (name, term) not in g_terms:
            g_terms[(name, term)] = g.new_zeros(sizes[term])
        g_terms[(name, term)][index] += g

    for i0, i1, a, c, kmax in plan.blocks():
        qb, go = q[:, :, i0:i1], grad_out[:, :, i0:i1]
        ob, lb = out[:, :, i0:i1], lse[:, :, i0:i1]
        delta = (go * ob).sum(-1)  # D (b, h, rows)
        present = []
        for name, side, j0, j1, ref in far_parts(plan, a, c, kmax):
            value = far_value(side, ob)
            o_adj = ob if value is None else ob - value  # D − dO·a (the value shift)
            pad = None if plan.pad is None else plan.pad[..., j0:j1]
            step = max(1, h // 4)  # a quarter of the heads per call: (b, h/4, part, d)
            for h0 in range(0, h, step):  # gradient temporaries, not (b, h, part, d) ones
                hs = slice(h0, h0 + step)
                qa, ka, va, rho = aug.part(plan, side, qb, i0, i1, j0, j1, ref, hs)
                lse_p = lb[:, hs] if rho is None else lb[:, hs] - rho
                gq, gk, gv = _FLASH_CPU_BWD(widen(go[:, hs], aug.width), qa, ka, va,
                                            widen(o_adj[:, hs], aug.width), lse_p, 0.0, False,
                                            attn_mask=pad, scale=plan.scale)
                dq[:, hs, i0:i1] += gq[..., :d]
                dk[:, hs, j0:j1] += gk[..., :d]
                dv[:, hs, j0:j1] += gv[..., :dv_]
                if side.key is not None:  # Σ_i dS_ij, through the key column
                    add_term(name, "key", gk[..., d], (slice(None), hs, slice(j0, j1)))
                if side.value is not None:
                    add_term(name, "value", gv[..., :dv_].sum(2, keepdim=True),
                             (slice(None), hs))
            present.append(name)
        s_band = None
        if c > a:
            g_band = g_tables + g_leaves
            s_band = _band_backward(plan, q, k, v, go, ob, lb, delta, i0, i1, a, c, dq, dk, dv,
                                    [*tables, *leaves], g_band)
            g_tables, g_leaves = g_band[:len(tables)], g_band[len(tables):]
        if u_left is not None and present:  # the row terms: Σ_j dS_ij over each far part
            sums = {}
            rest = -s_band if s_band is not None else torch.zeros_like(delta)
            if len(present) == 2:
                sums["left"] = (go * u_left[:, :, i0:i1]).sum(-1) - delta * w_left[:, :, i0:i1]
                sums["right"] = rest - sums["left"]
            else:
                sums[present[0]] = rest
            for name, g in sums.items():
                if sides[name].row is not None:
                    add_term(name, "row", g, (slice(None), slice(None), slice(i0, i1)))
    # the far terms' own graphs (T5's table, Shaw's q·a^K, DeBERTa's projections), once
    roots, grads = [], []
    for (name, term), g in g_terms.items():
        t = getattr(sides[name], term)
        if t.requires_grad:
            roots.append(t)
            grads.append(sum_to(g, t.shape))
    made = [t for t, d_t in zip(plan.band.tables, plan.tables, strict=True)
            if d_t.requires_grad] if plan.band is not None else []
    roots += [t for t, g in zip(made, g_tables, strict=True) if g is not None]
    grads += [g for g in g_tables if g is not None]
    # one root at a time: each pull's (b, h, n, d) temporaries are freed before the next
    for i, (root, g) in enumerate(zip(roots, grads, strict=True)):
        got = torch.autograd.grad(root, [plan.q_d, plan.k_d, *leaves], g, allow_unused=True,
                                  retain_graph=i < len(roots) - 1)
        if got[0] is not None:
            dq += got[0]
        if got[1] is not None:
            dk += got[1]
        _add_leaves(g_leaves, got[2:])
    return (None, dq if need[1] else None, dk if need[2] else None, dv if need[3] else None,
            *g_leaves)


def _band_backward(plan: BandPlan, q, k, v, go, ob, lb, delta, i0, i1, a, c, dq, dk, dv,
                   leaves, g_leaves) -> Tensor:
    """The band keys a:c of rows i0:i1: explicit P, dS, and dS pulled through the bias;
    returns Σ_(j in band) dS_ij ``(b, h, rows)``."""
    qb_l = q[:, :, i0:i1].detach().requires_grad_()
    kb_l = k[:, :, a:c].detach().requires_grad_()
    vb = v[:, :, a:c]
    with torch.enable_grad():
        bias = band_bias(plan, qb_l, kb_l, i0, i1, a, c)
    s = torch.matmul(qb_l.detach(), kb_l.detach().transpose(-1, -2)).mul_(plan.scale)
    s += bias.detach().to(s.dtype)
    s += band_mask(plan, i0, i1, a, c, s)
    p = s.sub_(lb[..., None].to(s.dtype)).exp_()  # P (b, h, rows, band)
    dp = torch.matmul(go, vb.transpose(-1, -2))
    if plan.positional.has_value_term:
        with torch.enable_grad():
            p_d = p.detach().requires_grad_()
            term = plan.positional.value_term(p_d, plan.q_positions[i0:i1],
                                              plan.k_positions[a:c])
        got = torch.autograd.grad(term, [p_d, *leaves], go, allow_unused=True)
        dp += got[0]
        _add_leaves(g_leaves, got[1:])
    dv[:, :, a:c] += torch.matmul(p.transpose(-1, -2), go)
    ds = dp.sub_(delta[..., None]).mul_(p)  # dS (b, h, rows, band)
    dq[:, :, i0:i1] += torch.matmul(ds, kb_l.detach()) * plan.scale
    dk[:, :, a:c] += torch.matmul(ds.transpose(-1, -2), qb_l.detach()) * plan.scale
    if bias.requires_grad:
        got = torch.autograd.grad(bias, [qb_l, kb_l, *leaves], sum_to(ds, bias.shape),
                                  allow_unused=True)
        if got[0] is not None:
            dq[:, :, i0:i1] += got[0]
        if got[1] is not None:
            dk[:, :, a:c] += got[1]
        _add_leaves(g_leaves, got[2:])
    return ds.sum(-1)


def _add_leaves(g_leaves: list, got) -> None:
    for i, g in enumerate(got):
        if g is not None:
            g_leaves[i] = g if g_leaves[i] is None else g_leaves[i] + g
