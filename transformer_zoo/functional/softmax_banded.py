"""Exact softmax attention with a logit bias that is separable past a band: fused far keys.

    rows I = i0 … i1 − 1, keys split by position:  left  {j : pos_j <= pos_i0 − R},
    band (the rest, |pos_j − pos_i| < R for some i ∈ I),  right {j : pos_j >= pos_(i1−1) + R}
    far:  S_ij = s·q_iᵀk_j + ρ_i + κ_j = s·[q_i, ρ_i/s, 1/s]ᵀ[k_j, 1, κ_j]  (``FarField``)
    O_I = Σ_parts e^(L_p − L) O_p,   L = logsumexp_p L_p            (one softmax over all keys)

Many relative biases are constant, or separable into a row and a key term, past some distance
R: T5's buckets and DeBERTa's log buckets saturate, Shaw's clipping ends, ALiBi is linear in
the distance. ``LogitBias.far_field`` gives those terms. Per block of query rows, the keys far
to the left and to the right then run through PyTorch's fused flash kernel with no mask (the
terms as extra head-dim columns of q and k, re-referenced at the key nearest the block so that
the columns stay small where the weights are not), a value term's constant as a shift of the
part's output, and only the band keys get the bias itself (``forward`` on the sub-block) and
an explicit softmax. The parts are merged through their log-sum-exps (as FlashAttention
merges key blocks). Backward: the fused backward of each far part with the merged O and L
(FlashAttention-2's dS = P ∘ (dP − D) with D from the merged O; a value shift enters as O − a),
whose extra columns return Σ_j dS_ij and Σ_i dS_ij, the gradients of the row and key terms;
the band's dS is pulled through its bias rows. Nothing of size n × m is built, and the bias
is evaluated on rows × (rows + 2R) pairs per block instead of rows × m.

Exact: the same softmax as the materialised kernel, to rounding (the re-referencing cancels in
the softmax; it keeps |ρ| and |κ| below the slope times the distance where they matter).
Served: CPU with the fused kernel, fp32/fp64, 1-D contiguous positions, no mask other than
key padding, no additive bias, no dropout; otherwise ``softmax_blockwise`` runs.

Shapes: b batch, h heads (k, v expanded to h), n query / m key length, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer_zoo.functional.block_grads import graph_nodes, leaf_variables
from transformer_zoo.functional.softmax_blockwise_lse import _FLASH_CPU, _FLASH_CPU_BWD
from transformer_zoo.positional.base import FarField, FarSide, LogitBias

#: Bias elements of one block's band (b · h · rows · band).
BAND_ELEMENTS = 2**21


@dataclass
class BandPlan:
    positional: LogitBias
    far: FarField  # terms built on (q_d, k_d), with their graphs
    radius: int
    q_positions: Tensor  # (n,)
    k_positions: Tensor  # (m,)
    pad: Tensor | None  # float (b, 1, 1, m): 0 or −inf
    causal: bool
    scale: float
    rows: int
    n: int
    m: int
    q_d: Tensor
    k_d: Tensor

    def blocks(self):
        """(i0, i1, a, c, kmax): keys :a far left, a:min(c, kmax) band, c:kmax far right."""
        q0, k0, r = int(self.q_positions[0]), int(self.k_positions[0]), self.radius
        for i0 in range(0, self.n, self.rows):
            i1 = min(i0 + self.rows, self.n)
            kmax = self.m if not self.causal else max(0, min(self.m, i1 + self.m - self.n))
            a = min(max(0, q0 + i0 - r - k0 + 1), kmax)  # pos_j <= pos_i0 − R
            c = max(a, min(kmax, q0 + i1 - 1 + r - k0))  # pos_j >= pos_(i1−1) + R
            if self.causal:  # far keys must be visible to every row of the block: the
                a = min(a, max(0, i0 + self.m - self.n + 1))  # right ones are not
                c = kmax
            yield i0, i1, a, c, kmax


class _Aug:
    """The key terms' head-dim column of one call: q_aug rows per block, one k/v buffer."""

    def __init__(self, plan: BandPlan, k: Tensor, v: Tensor) -> None:
        b, h, m, d = k.shape
        self.d = d
        self.extra = int(plan.far.left.key is not None or plan.far.right.key is not None)
        width = d + self.extra
        self.k = k if self.extra == 0 else k.new_zeros(b, h, m, width)
        self.v = v if v.shape[-1] == width else v.new_zeros(b, h, m, width)
        if self.extra:
            self.k[..., :d] = k
        if self.v is not v:
            self.v[..., :v.shape[-1]] = v
        self.shape = (b, h)

    def part(self, plan: BandPlan, side: FarSide, qb: Tensor, i0: int, i1: int, j0: int,
             j1: int, ref: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(q_aug, k_aug, v_aug, ρ) for rows i0:i1 against keys j0:j1 of one side; ρ
        ``(b, h, rows)`` (or None) is the row term, added to the part's log-sum-exp."""
        b, h = self.shape
        row = None if side.row is None else _expand(side.row, b, h, plan.n)[..., i0:i1]
        if side.key is None:
            qa = qb if self.extra == 0 else torch.cat([qb, qb.new_zeros(*qb.shape[:-1], 1)], -1)
            return qa, self.k[:, :, j0:j1], self.v[:, :, j0:j1], _cast(row, qb)
        key = _expand(side.key, b, h, plan.m)
        shift = key[..., ref:ref + 1]  # re-reference at the key nearest the block
        self.k[:, :, j0:j1, self.d] = key[..., j0:j1] - shift
        qa = torch.cat([qb, qb.new_full((*qb.shape[:-1], 1), 1.0 / plan.scale)], -1)
        row = shift.expand(b, h, i1 - i0) if row is None else row + shift
        return qa, self.k[:, :, j0:j1], self.v[:, :, j0:j1], _cast(row, qb)


def _cast(x: Tensor | None, like: Tensor) -> Tensor | None:
    return None if x is None else x.to(like.dtype)


def _expand(x: Tensor, b: int, h: int, length: int) -> Tensor:
    x = x.detach()
    while x.dim() < 3:
        x = x[None]
    return x.expand(b, h, length)


def _value(side: FarSide, like: Tensor) -> Tensor | None:
    return None if side.value is None else side.value.detach().to(like.dtype)


def _sides(plan: BandPlan, a: int, c: int, kmax: int):
    """(name, side, j0, j1, reference key) of the far parts of one block."""
    if a > 0:
        yield "left", plan.far.left, 0, a, a - 1
    if c < kmax:
        yield "right", plan.far.right, c, kmax, c


def _band_bias(plan: BandPlan, qb: Tensor, kb: Tensor, i0: int, i1: int, a: int,
               c: int) -> Tensor:
    pe = plan.positional
    args = (qb, plan.q_positions[i0:i1], plan.k_positions[a:c])
    return pe(*args, k=kb) if pe.needs_keys else pe(*args)


def _band_mask(plan: BandPlan, i0: int, i1: int, a: int, c: int, like: Tensor) -> Tensor:
    """The band's additive mask (b|1, 1, rows|1, band): padding and causality as −∞."""
    out = like.new_zeros(1, 1, 1, c - a)
    if plan.pad is not None:
        out = out + plan.pad[..., a:c].to(like.dtype)
    if plan.causal:
        i = torch.arange(i0, i1, device=like.device)[:, None]
        rule = torch.arange(a, c, device=like.device) <= i + (plan.m - plan.n)
        out = out.masked_fill(~rule, float("-inf"))
    return out


def _widen(x: Tensor, width: int) -> Tensor:
    return x if x.shape[-1] == width else torch.cat(
        [x, x.new_zeros(*x.shape[:-1], width - x.shape[-1])], -1)


def _row_grads(plan: BandPlan) -> bool:
    return any(t is not None and t.requires_grad for t in (plan.far.left.row, plan.far.right.row))


class BandedBiasAttention(torch.autograd.Function):
    """``apply(plan, q, k, v, *leaves) -> O``; see the module docstring."""

    @staticmethod
    def forward(ctx, plan: BandPlan, q: Tensor, k: Tensor, v: Tensor, *leaves: Tensor) -> Tensor:
        aug = _Aug(plan, k, v)
        dv_ = v.shape[-1]
        out = q.new_zeros(*q.shape[:-1], dv_)
        lse = q.new_zeros(q.shape[:-1])
        # a row term's gradient Σ_(j ∈ left) dS_ij needs the left part's share of the output
        # (the right's follows: a softmax row's dS sums to 0)
        keep = _row_grads(plan)
        u_left = torch.zeros_like(out) if keep else None
        w_left = torch.zeros_like(lse) if keep else None
        for i0, i1, a, c, kmax in plan.blocks():
            qb = q[:, :, i0:i1]
            outs, lses, names = [], [], []
            for name, side, j0, j1, ref in _sides(plan, a, c, kmax):
                qa, ka, va, rho = aug.part(plan, side, qb, i0, i1, j0, j1, ref)
                pad = None if plan.pad is None else plan.pad[..., j0:j1]
                o, l_ = _FLASH_CPU(qa, ka, va, attn_mask=pad, scale=plan.scale)
                o = o[..., :dv_]
                value = _value(side, o)
                outs.append(o if value is None else o + value)
                if rho is not None:
                    l_ = l_ + rho
                if pad is not None:  # a part whose keys are all padding has no mass
                    l_ = l_.masked_fill(torch.isneginf(pad).all(-1), float("-inf"))
                lses.append(l_)
                names.append(name)
            if c > a:
                kb, vb = k[:, :, a:c], v[:, :, a:c]
                s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(plan.scale)
                s += _band_bias(plan, qb, kb, i0, i1, a, c).to(s.dtype)
                s += _band_mask(plan, i0, i1, a, c, s)
                l_ = torch.logsumexp(s, dim=-1)
                p = s.sub_(l_.masked_fill(torch.isneginf(l_), 0.0)[..., None]).exp_()
                o = torch.matmul(p, vb)
                if plan.positional.has_value_term:
                    o = o + plan.positional.value_term(p, plan.q_positions[i0:i1],
                                                       plan.k_positions[a:c])
                outs.append(o)
                lses.append(l_)
                names.append("band")
            if not outs:
                continue
            ls = torch.stack(lses)  # (parts, b, h, rows)
            total = torch.logsumexp(ls, dim=0)
            total = total.masked_fill(torch.isneginf(total), 0.0)  # dead rows: O = 0, L = 0
            w = (ls - total).exp()
            out[:, :, i0:i1] = sum(wp[..., None] * op for wp, op in zip(w, outs, strict=True))
            lse[:, :, i0:i1] = total
            if keep and "left" in names:
                wl = w[names.index("left")]
                u_left[:, :, i0:i1] = wl[..., None] * outs[names.index("left")]
                w_left[:, :, i0:i1] = wl
        ctx.plan = plan
        ctx.leaves = leaves
        ctx.save_for_backward(q, k, v, out, lse, u_left, w_left)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        return _backward(ctx.plan, *ctx.saved_tensors, grad_out.contiguous(), list(ctx.leaves),
                         ctx.needs_input_grad)


def _backward(plan: BandPlan, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              u_left: Tensor | None, w_left: Tensor | None, grad_out: Tensor,
              leaves: list[Tensor], need: tuple[bool, ...]) -> tuple:
    aug = _Aug(plan, k, v)
    b, h, n, d = q.shape
    dv_ = v.shape[-1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    sides = {"left": plan.far.left, "right": plan.far.right}
    g_terms: dict[tuple[str, str], Tensor] = {}
    g_leaves: list[Tensor | None] = [None] * len(leaves)
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
        for name, side, j0, j1, ref in _sides(plan, a, c, kmax):
            qa, ka, va, rho = aug.part(plan, side, qb, i0, i1, j0, j1, ref)
            value = _value(side, ob)
            o_adj = ob if value is None else ob - value  # D − dO·a (the value shift)
            width = qa.shape[-1]
            pad = None if plan.pad is None else plan.pad[..., j0:j1]
            gq, gk, gv = _FLASH_CPU_BWD(_widen(go, width), qa, ka, va, _widen(o_adj, width),
                                        lb if rho is None else lb - rho, 0.0, False,
                                        attn_mask=pad, scale=plan.scale)
            dq[:, :, i0:i1] += gq[..., :d]
            dk[:, :, j0:j1] += gk[..., :d]
            dv[:, :, j0:j1] += gv[..., :dv_]
            if side.key is not None:  # Σ_i dS_ij, through the key column
                add_term(name, "key", gk[..., d], (slice(None), slice(None), slice(j0, j1)))
            if side.value is not None:
                add_term(name, "value", gv[..., :dv_].sum(2, keepdim=True), (Ellipsis,))
            present.append(name)
        s_band = None
        if c > a:
            s_band = _band_backward(plan, q, k, v, go, ob, lb, delta, i0, i1, a, c, dq, dk, dv,
                                    leaves, g_leaves)
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
            grads.append(_sum_to(g, t.shape))
    if roots:
        got = torch.autograd.grad(roots, [plan.q_d, plan.k_d, *leaves], grads,
                                  allow_unused=True)
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
        bias = _band_bias(plan, qb_l, kb_l, i0, i1, a, c)
    s = torch.matmul(qb_l.detach(), kb_l.detach().transpose(-1, -2)).mul_(plan.scale)
    s += bias.detach().to(s.dtype)
    s += _band_mask(plan, i0, i1, a, c, s)
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
        got = torch.autograd.grad(bias, [qb_l, kb_l, *leaves], _sum_to(ds, bias.shape),
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


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``x`` down to ``shape`` (leading dims dropped, size-1 dims summed)."""
    while x.dim() > len(shape):
        x = x.sum(0)
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1]
    return x.sum(dims, keepdim=True) if dims else x


def _contiguous(p: Tensor) -> bool:
    if p.ndim == 2 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 1:
        return False
    return p.numel() < 2 or bool((p[1:] - p[:-1] == 1).all())


def _worth_it(m: int, rows: int, band: int) -> bool:
    """The far keys are most of the keys (else the blockwise kernel is as good)."""
    return m >= 4 * (rows + band)


def banded_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, *, positional: LogitBias, q_positions: Tensor,
    k_positions: Tensor, mask: Tensor | None, causal: bool, scale: float,
    block_size: int | None,
) -> Tensor | None:
    """The band kernel's output, or None when it does not serve this call (then the caller
    runs the blockwise kernel). k, v already expanded to h heads."""
    b, h, n, d = q.shape
    m = k.shape[2]
    if _FLASH_CPU is None or q.device.type != "cpu" or q.dtype not in (
            torch.float32, torch.float64) or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if not (_contiguous(q_positions) and _contiguous(k_positions)):
        return None
    pad = None
    if mask is not None:
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            return None  # only key padding masks (b|1, 1, 1, m)
        pad = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, float("-inf")).expand(b, 1, 1, m)
    radius = positional.far_radius()
    if radius is None:
        return None
    band = 2 * radius
    rows = block_size or max(16, min(512, BAND_ELEMENTS // max(1, b * h * (band + 256))))
    rows = min(rows, n)
    if not _worth_it(m, rows, band):
        return None
    q_d, k_d = q.detach().requires_grad_(), k.detach().requires_grad_()
    qp, kp = q_positions.reshape(-1), k_positions.reshape(-1)
    with torch.enable_grad():
        far = positional.far_field(q_d, qp, kp, k=k_d if positional.needs_keys else None)
    plan = BandPlan(positional, far, radius, qp, kp, pad, causal, scale, rows, n, m, q_d, k_d)
    leaves: list[Tensor] = []
    if torch.is_grad_enabled():
        with torch.enable_grad():
            roots = [t for side in (far.left, far.right)
                     for t in (side.row, side.key, side.value) if t is not None]
            probe = _band_bias(plan, q_d[:, :, :1], k_d[:, :, :1], 0, 1, 0, 1)
            roots.append(probe)
            if positional.has_value_term:
                roots.append(positional.value_term(q_d.new_ones(b, h, 1, 1), qp[:1], kp[:1]))
        leaves = [t for t in leaf_variables(graph_nodes(roots))
                  if t is not q_d and t is not k_d]
    return BandedBiasAttention.apply(plan, q, k, v, *leaves)
