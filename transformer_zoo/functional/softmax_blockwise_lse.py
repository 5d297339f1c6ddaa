"""The blockwise bias attention's autograd Function: saves the log-sum-exp, never the weights.

    forward, per block I of query rows:   S_I = Q_I Kᵀ · s + B_I (+ −∞ where masked)
        O_I = softmax(S_I) V [+ value term],   L_I = logsumexp(S_I)         (saved: O, L)
    backward, per block, from Q, K, V, O, L and B_I recomputed:
        P_I = exp(S_I − L_I),  dP_I = dO_I Vᵀ [+ ∂ value term],  D_I = rowsum(dO_I ∘ O_I)
        dS_I = P_I ∘ (dP_I − D_I),  dQ_I = dS_I K s,  dK += dS_Iᵀ Q_I s,  dV += P_Iᵀ dO_I,
        and dS_I is pulled back through B_I (T5's table, Shaw's embeddings, XL's u, v, W_R, ...)

The backward of FlashAttention (Dao et al. 2022, arXiv 2205.14135, Alg. 4 / FlashAttention-2,
Dao 2023, arXiv 2307.08691) done one block of query rows at a time in plain torch, with the
gradient of the bias term added: exact (the same softmax, to rounding), and one block's
``(b, h, rows, m)`` tensors alive at a time instead of the ``(b, h, n, m)`` bias, weights and
bias gradient. Unlike ``torch.utils.checkpoint`` around each block, the forward is not run
twice: only the bias rows are recomputed. On CPU a block without a value term runs the forward
through PyTorch's fused flash kernel (which returns L), and a block whose bias needs no
gradient (ALiBi, a frozen T5 table) also its backward; other blocks use matmuls.

The bias's leaves (the encoding's parameters, including ones it borrows such as DeBERTa's
shared key projection, and an additive ``bias`` that requires grad) are found by a one-row
probe of its autograd graph and passed to the Function as inputs, so their gradients come back
through the normal autograd engine (``backward`` and ``torch.autograd.grad`` alike). First
order only (no double backward). Dropout is not supported here (the caller keeps the
checkpointed path for it).

Shapes: b batch, h heads (k, v already expanded to h), n query / m key length, d head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from transformer_zoo.functional.block_grads import (
    BlockGrads,
    graph_nodes,
    leaf_variables,
    shared_nodes,
)
from transformer_zoo.positional.base import LogitBias

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def row_block(x: Tensor | None, i0: int, i1: int) -> Tensor | None:
    """Rows i0:i1 of a 4-D tensor broadcastable to (b, h, n, m) (a size-1 row dim
    broadcasts: returned whole)."""
    if x is None or x.shape[-2] == 1:
        return x
    return x[..., i0:i1, :]


def causal_rows(i0: int, i1: int, n: int, m: int, kmax: int, device: torch.device) -> Tensor:
    """Rows i0:i1, keys :kmax of the bottom-right aligned causal mask: key j <= i + (m − n)."""
    i = torch.arange(i0, i1, device=device)[:, None]
    return torch.arange(kmax, device=device) <= i + (m - n)  # (rows, kmax)


def _probabilities(qb: Tensor, k: Tensor, addend: Tensor, scale: float, lse: Tensor) -> Tensor:
    """P = exp(Q_I Kᵀ · s + addend − L) in place of the scores (b, h, rows, kmax)."""
    s = torch.matmul(qb, k.transpose(-1, -2)).mul_(scale).add_(addend)
    return s.sub_(lse[..., None].to(s.dtype)).exp_()


@dataclass
class Plan:
    """What one call attends with (everything but the differentiable tensors)."""

    positional: LogitBias | None
    q_positions: Tensor
    k_positions: Tensor
    mask: Tensor | None  # bool, broadcastable to (b, h, n, m)
    causal: bool
    scale: float
    rows: int
    n: int
    m: int
    #: with grad: (q_d, k_d, rows, shared nodes) built once per call on detached leaf views
    #: of q and k (the per-call work of the bias keeps its small graph until the backward)
    grad_rows: tuple[Tensor, Tensor, Callable[[int, int], Tensor] | None, set] | None = None

    @property
    def value_term(self) -> bool:
        return self.positional is not None and self.positional.has_value_term

    def blocks(self):
        """(i0, i1, kmax): query rows i0:i1 see keys :kmax (causal: j <= i + m − n)."""
        for i0 in range(0, self.n, self.rows):
            i1 = min(i0 + self.rows, self.n)
            kmax = self.m
            if self.causal and not self.value_term:
                kmax = max(0, min(self.m, i1 + self.m - self.n))
            yield i0, i1, kmax

    def rows_fn(self, q: Tensor, k: Tensor) -> Callable[[int, int], Tensor] | None:
        pe = self.positional
        if pe is None:
            return None
        return pe.bias_rows(q, self.q_positions, self.k_positions,
                            k=k if pe.needs_keys else None)

    def bias(self, rows_fn, bias: Tensor | None, i0: int, i1: int, kmax: int) -> Tensor | None:
        """Rows i0:i1, keys :kmax of the encoding's bias plus ``bias`` (with its graph)."""
        total = None if rows_fn is None else rows_fn(i0, i1)
        if bias is not None:
            part = row_block(bias, i0, i1)
            total = part if total is None else total + part
        return None if total is None else total[..., :kmax]

    def addend(self, total: Tensor | None, q: Tensor, i0: int, i1: int, kmax: int) -> Tensor:
        """The block's additive float term: bias rows, −∞ where the mask or causality forbid."""
        allowed = None if self.mask is None else row_block(self.mask, i0, i1)[..., :kmax]
        if self.causal:
            rule = causal_rows(i0, i1, self.n, self.m, kmax, q.device)
            allowed = rule if allowed is None else allowed & rule
        out = q.new_zeros(()) if total is None else total.detach().to(q.dtype)
        if allowed is not None:
            out = out.masked_fill(~allowed, float("-inf"))
        return out if out.dim() == 4 else out.expand(1, 1, i1 - i0, kmax)


def _rng_state(x: Tensor) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None


def _set_rng_state(x: Tensor, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], x.device)


def _rng_fork(x: Tensor):
    return torch.random.fork_rng(devices=[x.device] if x.is_cuda else [])


def _fused(q: Tensor) -> bool:
    return _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in _FUSED_DTYPES


def _weights(qb: Tensor, k: Tensor, addend: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """P (b, h, rows, kmax) and L (b, h, rows); a row with no finite logit: P = 0, L = 0."""
    s = torch.matmul(qb, k.transpose(-1, -2)).mul_(scale).add_(addend)
    lse = torch.logsumexp(s, dim=-1)
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)
    return s.sub_(lse[..., None]).exp_(), lse


def prepare_grad(plan: Plan, q: Tensor, k: Tensor) -> list[Tensor]:
    """With grad: build the bias's per-call work once on detached leaf views of q and k
    (kept in ``plan.grad_rows`` for the forward and the backward, with the autograd nodes of
    that shared work: ``block_grads``) and return the tensors requiring grad that the bias
    and value term read besides q and k: the leaves of the graph of a one-row probe (the
    encoding's parameters, and tensors it borrows, such as DeBERTa's shared projections)."""
    q_d, k_d = q.detach().requires_grad_(), k.detach().requires_grad_()
    with torch.enable_grad():
        rows_fn = plan.rows_fn(q_d, k_d)
    roots, shared = [], set()
    with _rng_fork(q), torch.enable_grad():  # the probes leave the RNG as they found it
        if rows_fn is not None:
            roots.append(plan.bias(rows_fn, None, 0, 1, plan.m))
            shared = shared_nodes(lambda i0, i1: plan.bias(rows_fn, None, i0, i1, plan.m),
                                  plan.n)
        if plan.value_term:
            w = q_d.new_ones(q.shape[0], q.shape[1], 1, plan.m)
            roots.append(plan.positional.value_term(  # type: ignore[union-attr]
                w, plan.q_positions[..., :1], plan.k_positions))
    plan.grad_rows = (q_d, k_d, rows_fn, shared)
    return [t for t in leaf_variables(graph_nodes(roots)) if t is not q_d and t is not k_d]


class BlockwiseBiasAttention(torch.autograd.Function):
    """``apply(plan, q, k, v, bias, *leaves) -> O``; see the module docstring."""

    @staticmethod
    def forward(ctx, plan: Plan, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                *leaves: Tensor) -> Tensor:
        rows_fn = plan.grad_rows[2] if plan.grad_rows is not None else plan.rows_fn(q, k)
        ctx.rng = _rng_state(q)  # rows may draw: the backward replays the same draws
        fused = _fused(q) and not plan.value_term
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        lse = q.new_zeros(q.shape[:-1], dtype=torch.float32 if q.dtype in (
            torch.bfloat16, torch.float16) else q.dtype)
        for i0, i1, kmax in plan.blocks():
            if kmax == 0:
                continue
            qb, kb, vb = q[:, :, i0:i1], k[:, :, :kmax], v[:, :, :kmax]
            addend = plan.addend(plan.bias(rows_fn, bias, i0, i1, kmax), q, i0, i1, kmax)
            if fused:
                o, l_ = _FLASH_CPU(qb, kb, vb, attn_mask=addend, scale=plan.scale)
            else:
                p, l_ = _weights(qb, kb, addend, plan.scale)
                o = torch.matmul(p, vb)
                if plan.value_term:
                    o = o + plan.positional.value_term(  # type: ignore[union-attr]
                        p, plan.q_positions[..., i0:i1], plan.k_positions)
            out[:, :, i0:i1] = o
            lse[:, :, i0:i1] = l_
        ctx.plan = plan
        ctx.leaves = leaves  # the very tensors (the backward matches autograd leaves by identity)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        leaves = ctx.leaves
        q_d, k_d, rows_fn, shared = ctx.plan.grad_rows
        grads = BlockGrads([q_d, k_d, *leaves], shared)
        g_bias = None if bias is None or not bias.requires_grad else torch.zeros_like(bias)
        with _rng_fork(q):
            _set_rng_state(q, ctx.rng)
            dq, dk, dv = _backward_blocks(ctx.plan, q, k, v, bias, out, lse, grad_out,
                                          rows_fn, grads, g_bias)
        g_q, g_k, *rest = grads.finish()
        g_q = dq if g_q is None else dq + g_q
        g_k = dk if g_k is None else dk + g_k
        need = ctx.needs_input_grad
        return (None, g_q if need[1] else None, g_k if need[2] else None,
                dv if need[3] else None, g_bias if need[4] else None, *rest)


def _add_matmul(acc: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
    """acc += alpha · a @ b over (b, h) batches, in place (no temporary of acc's size)."""
    for i in range(acc.shape[0]):  # batch entries: (h, ·, ·) 3-D views for baddbmm_
        acc[i].baddbmm_(a[i], b[i], alpha=alpha)


def _backward_blocks(plan: Plan, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                     out: Tensor, lse: Tensor, grad_out: Tensor, rows_fn, grads: BlockGrads,
                     g_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's loop over query blocks -> (dq, dk, dv) of the content path; the
    encoding's inputs' gradients go to ``grads``, the additive bias's to ``g_bias``."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    fused = _fused(q) and not plan.value_term
    for i0, i1, kmax in plan.blocks():
        if kmax == 0:
            continue
        qb, kb, vb = q[:, :, i0:i1], k[:, :, :kmax], v[:, :, :kmax]
        go = grad_out[:, :, i0:i1].contiguous()  # dO (b, h, rows, d_v)
        with torch.enable_grad():
            total = plan.bias(rows_fn, None if bias is None else bias.detach(), i0, i1, kmax)
        addend = plan.addend(total, q, i0, i1, kmax)
        learned = total is not None and total.requires_grad
        if fused and not learned and g_bias is None:  # fixed bias: fused kernel
            # a quarter of the heads per call: its dk, dv outputs are (b, h/4, kmax, d)
            # temporaries, not (b, h, kmax, d) ones
            step = max(1, q.shape[1] // 4)
            for h0 in range(0, q.shape[1], step):
                hs = slice(h0, h0 + step)
                mask = addend if addend.shape[1] == 1 else addend[:, hs]
                gq, gk, gv = _FLASH_CPU_BWD(go[:, hs], qb[:, hs], kb[:, hs], vb[:, hs],
                                            out[:, hs, i0:i1], lse[:, hs, i0:i1], 0.0, False,
                                            attn_mask=mask, scale=plan.scale)
                dq[:, hs, i0:i1] += gq
                dk[:, hs, :kmax] += gk
                dv[:, hs, :kmax] += gv
            continue
        p = _probabilities(qb, kb, addend, plan.scale, lse[:, :, i0:i1])  # P (b, h, rows, kmax)
        dp = torch.matmul(go, vb.transpose(-1, -2))  # dP (b, h, rows, kmax)
        if plan.value_term:
            with torch.enable_grad():
                p_d = p.detach().requires_grad_()
                term = plan.positional.value_term(  # type: ignore[union-attr]
                    p_d, plan.q_positions[..., i0:i1], plan.k_positions)
            dp += grads.pull(term, go, (p_d,))[0]
        _add_matmul(dv[:, :, :kmax], p.transpose(-1, -2), go)
        delta = (go * out[:, :, i0:i1]).sum(-1, keepdim=True)  # D (b, h, rows, 1)
        ds = dp.sub_(delta.to(dp.dtype)).mul_(p)  # dS (b, h, rows, kmax)
        _add_matmul(dq[:, :, i0:i1], ds, kb, plan.scale)
        _add_matmul(dk[:, :, :kmax], ds.transpose(-1, -2), qb, plan.scale)
        if learned:
            grads.pull(total, sum_to(ds, total.shape))
        if g_bias is not None:
            rows = row_block(g_bias, i0, i1)[..., :kmax]  # a view: summed in place
            rows += sum_to(ds, rows.shape)
    return dq, dk, dv


def sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``x`` down to a broadcastable ``shape`` (the bias rows may broadcast over b or h;
    leading dims that ``shape`` lacks are summed away)."""
    while x.dim() > len(shape):
        x = x.sum(0)
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1]
    return x.sum(dims, keepdim=True) if dims else x
