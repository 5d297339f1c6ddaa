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


import torch
from torch import Tensor

from transformer_zoo.functional.block_grads import graph_nodes, leaf_variables
from transformer_zoo.functional.softmax_banded_backward import banded_backward
from transformer_zoo.functional.softmax_banded_parts import (
    BAND_ELEMENTS,
    Aug,
    BandPlan,
    band_bias,
    band_mask,
    far_parts,
    far_value,
    row_grads,
)
from transformer_zoo.functional.softmax_blockwise_lse import _FLASH_CPU
from transformer_zoo.positional.base import LogitBias


class BandedBiasAttention(torch.autograd.Function):
    """``apply(plan, q, k, v, *leaves) -> O``; see the module docstring."""

    @staticmethod
    def forward(ctx, plan: BandPlan, q: Tensor, k: Tensor, v: Tensor, *leaves: Tensor) -> Tensor:
        aug = Aug(plan, k, v)
        dv_ = v.shape[-1]
        b, h, n = q.shape[:3]
        # (b, n, h, d_v) storage, as the fused kernel returns it: the module's merge of the
        # heads is then a view, not a copy
        out = q.new_zeros(b, n, h, dv_).transpose(1, 2)
        lse = q.new_zeros(q.shape[:-1])
        # a row term's gradient Σ_(j ∈ left) dS_ij needs the left part's share of the output
        # (the right's follows: a softmax row's dS sums to 0)
        keep = plan.grad and row_grads(plan)
        u_left = torch.zeros_like(out) if keep else None
        w_left = torch.zeros_like(lse) if keep else None
        for i0, i1, a, c, kmax in plan.blocks():
            qb = q[:, :, i0:i1]
            outs, lses, names = [], [], []
            for name, side, j0, j1, ref in far_parts(plan, a, c, kmax):
                pad = None if plan.pad is None else plan.pad[..., j0:j1]
                os_, ls_ = [], []
                for hs in aug.heads(h):
                    qa, ka, va, rho = aug.part(plan, side, qb, i0, i1, j0, j1, ref, hs)
                    o, l_ = _FLASH_CPU(qa, ka, va, attn_mask=pad, scale=plan.scale)
                    os_.append(o[..., :dv_])
                    ls_.append(l_ if rho is None else l_ + rho)
                o, l_ = torch.cat(os_, 1), torch.cat(ls_, 1)
                value = far_value(side, o)
                outs.append(o if value is None else o + value)
                if pad is not None:  # a part whose keys are all padding has no mass
                    l_ = l_.masked_fill(torch.isneginf(pad).all(-1), float("-inf"))
                lses.append(l_)
                names.append(name)
            if c > a:
                kb, vb = k[:, :, a:c], v[:, :, a:c]
                s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(plan.scale)
                s += band_bias(plan, qb, kb, i0, i1, a, c).to(s.dtype)
                s += band_mask(plan, i0, i1, a, c, s)
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
        return banded_backward(ctx.plan, *ctx.saved_tensors, grad_out, list(ctx.leaves),
                         ctx.needs_input_grad)


def _contiguous(p: Tensor) -> bool:
    if p.ndim == 2 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 1:
        return False
    return p.numel() < 2 or bool((p[1:] - p[:-1] == 1).all())


def _worth_it(m: int, rows: int, band: int) -> bool:
    """Some key lies outside a block's band. Measured (fwd+bwd, 1 thread, d_model 512, 8
    heads): never slower than the blockwise kernel within noise, and faster as the far share
    grows (DeBERTa, R = 511: n = 2048 1.13 vs 1.43 s, 4096 3.7 vs 7.5 s and 125 vs 317 MiB; it
    was served only from m >= 4 (rows + band) before)."""
    return m > rows + band


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
    rows = block_size or max(16, min(256, BAND_ELEMENTS // max(1, b * h * (band + 256))))
    rows = min(rows, n)
    if not _worth_it(m, rows, band):
        return None
    q_d, k_d = q.detach().requires_grad_(), k.detach().requires_grad_()
    qp, kp = q_positions.reshape(-1), k_positions.reshape(-1)
    with torch.enable_grad():
        far = positional.far_field(q_d, qp, kp, k=k_d if positional.needs_keys else None)
        band = positional.band_rows(q_d, qp, kp, k=k_d if positional.needs_keys else None)
    tables = tuple(t.detach().requires_grad_(t.requires_grad) for t in band.tables)
    plan = BandPlan(positional, far, radius, qp, kp, pad, causal, scale, rows, n, m, q_d, k_d,
                    grad=torch.is_grad_enabled(), band=band, tables=tables)
    leaves: list[Tensor] = []
    if torch.is_grad_enabled():
        with torch.enable_grad():
            roots = [t for side in (far.left, far.right)
                     for t in (side.row, side.key, side.value) if t is not None]
            roots += [t for t in band.tables if t.requires_grad]
            probe = band_bias(plan, q_d[:, :, :1], k_d[:, :, :1], 0, 1, 0, 1)
            roots.append(probe)
            if positional.has_value_term:
                roots.append(positional.value_term(q_d.new_ones(b, h, 1, 1), qp[:1], kp[:1]))
        leaves = [t for t in leaf_variables(graph_nodes(roots))
                  if t is not q_d and t is not k_d]
    return BandedBiasAttention.apply(plan, q, k, v, *leaves)
