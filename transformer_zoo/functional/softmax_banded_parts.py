"""The band kernel's pieces (``functional.softmax_banded``): its plan, a far part's widened
q, k, v, and the band's bias and mask. Shapes as there."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer_zoo.positional.base import BandRows, FarField, FarSide, LogitBias

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
    grad: bool = True  # a backward may follow (grad mode at the call)
    band: BandRows | None = None  # the band's bias rows; None: ``forward`` per sub-block
    tables: tuple[Tensor, ...] = ()  # band.tables detached (requiring grad where they do)

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


class Aug:
    """One far part's q, k, v, widened by the key terms' column (then all to one width, as
    the fused kernel wants), one group of heads at a time."""

    def __init__(self, plan: BandPlan, k: Tensor, v: Tensor) -> None:
        self.k, self.v, self.d = k, v, k.shape[-1]
        self.extra = int(plan.far.left.key is not None or plan.far.right.key is not None)
        self.width = max(self.d + self.extra, v.shape[-1])
        self.groups = 1 if self.width == self.d == v.shape[-1] else 4

    def heads(self, h: int) -> list[slice]:
        """Head groups of a call: a quarter of the heads where q, k, v are copied (widened)."""
        step = max(1, h // self.groups)
        return [slice(h0, h0 + step) for h0 in range(0, h, step)]

    def part(self, plan: BandPlan, side: FarSide, qb: Tensor, i0: int, i1: int, j0: int,
             j1: int, ref: int, hs: slice) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(q_aug, k_aug, v_aug, ρ) of heads hs, rows i0:i1, keys j0:j1 of one side; ρ
        ``(b, |hs|, rows)`` (or None) is the row term, added to the part's log-sum-exp."""
        b, h = qb.shape[:2]
        qa, ka, va = qb[:, hs], self.k[:, hs, j0:j1], self.v[:, hs, j0:j1]
        row = None if side.row is None else expand(side.row, b, h, plan.n)[:, hs, i0:i1]
        if side.key is not None:
            key = expand(side.key, b, h, plan.m)[:, hs]
            shift = key[..., ref:ref + 1]  # re-reference at the key nearest the block
            ka = torch.cat([ka, (key[..., j0:j1] - shift)[..., None].to(ka.dtype)], -1)
            qa = torch.cat([qa, qa.new_full((*qa.shape[:-1], 1), 1.0 / plan.scale)], -1)
            row = shift.expand(*shift.shape[:2], i1 - i0) if row is None else row + shift
        return (widen(qa, self.width), widen(ka, self.width), widen(va, self.width),
                cast(row, qb))


def cast(x: Tensor | None, like: Tensor) -> Tensor | None:
    return None if x is None else x.to(like.dtype)


def expand(x: Tensor, b: int, h: int, length: int) -> Tensor:
    x = x.detach()
    while x.dim() < 3:
        x = x[None]
    return x.expand(b, h, length)


def far_value(side: FarSide, like: Tensor) -> Tensor | None:
    return None if side.value is None else side.value.detach().to(like.dtype)


def far_parts(plan: BandPlan, a: int, c: int, kmax: int):
    """(name, side, j0, j1, reference key) of the far parts of one block."""
    if a > 0:
        yield "left", plan.far.left, 0, a, a - 1
    if c < kmax:
        yield "right", plan.far.right, c, kmax, c


def band_bias(plan: BandPlan, qb: Tensor, kb: Tensor, i0: int, i1: int, a: int,
               c: int) -> Tensor:
    qp, kp = plan.q_positions[i0:i1], plan.k_positions[a:c]
    if plan.band is not None:
        return plan.band.rows(plan.tables, qb, kb, qp, kp)
    pe = plan.positional
    return pe(qb, qp, kp, k=kb) if pe.needs_keys else pe(qb, qp, kp)


def band_mask(plan: BandPlan, i0: int, i1: int, a: int, c: int, like: Tensor) -> Tensor:
    """The band's additive mask (b|1, 1, rows|1, band): padding and causality as −∞."""
    out = like.new_zeros(1, 1, 1, c - a)
    if plan.pad is not None:
        out = out + plan.pad[..., a:c].to(like.dtype)
    if plan.causal:
        i = torch.arange(i0, i1, device=like.device)[:, None]
        rule = torch.arange(a, c, device=like.device) <= i + (plan.m - plan.n)
        out = out.masked_fill(~rule, float("-inf"))
    return out


def widen(x: Tensor, width: int) -> Tensor:
    return x if x.shape[-1] == width else torch.cat(
        [x, x.new_zeros(*x.shape[:-1], width - x.shape[-1])], -1)


def row_grads(plan: BandPlan) -> bool:
    return any(t is not None and t.requires_grad for t in (plan.far.left.row, plan.far.right.row))
