"""Row helpers shared by the causal FAVOR kernels that form features inside the scan.

``favor_causal_fused.py`` (affine maps) and ``favor_causal_tiled.py`` (any map naming its
tensors) serve ``causal_linear.scan_rows`` a tile of rows at a time: [v, 1] (``OnesColumn``), the
ratio num / den of a tile's y = [num, den] (``ratio_rows``), and backward's
∂[num, den] = [∂out / den, −(∂out · out) / den] from each tile's recomputed y
(``OutputGrad``). Shapes: v, ∂out ``(b, h, n, d_v)``; 1/den ``(b, h, n, 1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class OnesColumn:
    """[v, 1] along the last dim, built a tile of rows at a time (for ``scan_rows``)."""

    def __init__(self, v: Tensor) -> None:
        self.v, self.shape = v, (*v.shape[:-1], v.shape[-1] + 1)
        self.new_zeros = v.new_zeros

    def __getitem__(self, key) -> Tensor:
        t = self.v[key]
        return torch.cat([t, t.new_ones(*t.shape[:-1], 1)], -1)


def ratio_rows(y: Tensor) -> Tensor:
    """out = num / den from a tile's y = [num, den] (0 where den = 0: no key)."""
    den = y[..., -1:]
    live = den > 0
    return torch.where(live, y[..., :-1] / torch.where(live, den, 1.0), 0.0)


class OutputGrad:
    """∂[num, den] = [∂out / den, −(∂out · out) / den], a tile of rows at a time.

    ``h_rows(index, slice, y)`` (a ``scan_rows`` h callable): the tile's rows from its
    recomputed y = [num, den] (out is not saved for backward), recording ∂den; indexing then
    serves the rows of every tile seen so far (the reverse scan's x)."""

    def __init__(self, grad: Tensor, inv: Tensor) -> None:
        self.grad, self.inv = grad, inv
        self.shape = (*grad.shape[:-1], grad.shape[-1] + 1)
        self.new_zeros = grad.new_zeros
        self.dden = inv.new_empty(inv.shape)  # (b, h, n, 1)

    def h_rows(self, index: int, sl: slice, y: Tensor) -> Tensor:
        g, inv = self.grad[..., sl, :], self.inv[..., sl, :]
        dden = (g * ratio_rows(y)).sum(-1, keepdim=True).mul_(inv).neg_()
        self.dden[..., sl, :] = dden
        return torch.cat([g * inv, dden], -1)

    def __getitem__(self, key) -> Tensor:
        g, inv = self.grad[key], self.inv[key]
        return torch.cat([g * inv, self.dden[key]], -1)
