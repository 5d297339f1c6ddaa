"""Nyström's depthwise residual convolution over the sequence, with no im2col-sized buffers.

    out[b, h, i, c] = Σ_t w[h, t] · v[b, h, i + t − ⌊k/2⌋, c]     (zero outside 0 <= · < n)

Xiong et al. 2021 ("Nyströmformer", arXiv 2102.03902, section 3.3) add this convolution of V
(one kernel of odd length k per head, shared across the head's channels; 33 in the paper) to
the attention output. It equals ``F.conv2d(v, w, padding=(k // 2, 0), groups=h)`` with
``w`` of shape ``(h, 1, k, 1)`` (``nn.Conv2d``'s weight, which the module keeps), but computed
as k shifted multiply-adds into one output buffer, and backward as k shifted multiply-adds
into ∂v plus k inner products for ∂w, a block of rows at a time. The CPU convolution
reorders its input, output and gradients into blocked layouts inside the op, several
copies of V at once (measured: 55 MiB of a 173 MiB fwd+bwd peak at n = 8192, 8 heads × 64);
here forward and backward hold nothing of V's size but their outputs.

Exact up to the order of the sums (fp32 rounding; equal to ``F.conv2d`` in fp64 to 1e-12,
tested); under autocast v and w are cast first, as autocast casts a convolution's inputs.
Under torch.compile / export (traced code) it is ``F.conv2d`` itself: the taps' row ranges
would put guards on a symbolic length. Low-precision inputs accumulate in fp32.
Shapes: v ``(b, h, n, d)``, w ``(h, 1, k, 1)`` -> ``(b, h, n, d)`` in v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROWS = 1024  # rows per block of the ∂w inner products (a temporary of b·h·ROWS·d entries)


def _shifts(n: int, k: int):
    """(t, output rows, input rows) for each tap t: out[lo:hi] += w_t · v[lo + s : hi + s]."""
    for t in range(k):
        s = t - k // 2
        lo, hi = max(0, -s), min(n, n - s)
        if lo < hi:
            yield t, slice(lo, hi), slice(lo + s, hi + s)


def _accumulate(x: Tensor, w: Tensor, reverse: bool, dtype: torch.dtype) -> Tensor:
    """Σ_t w_t · x shifted by +s (forward) or −s (the transposed convolution, backward)."""
    *_, n, _ = x.shape
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    taps = w.reshape(w.shape[0], -1).to(dtype)  # (h, k)
    for t, rows_out, rows_in in _shifts(n, taps.shape[-1]):
        if reverse:
            rows_out, rows_in = rows_in, rows_out
        out[..., rows_out, :].addcmul_(x[..., rows_in, :], taps[:, t, None, None])
    return out


class _SequenceConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, w: Tensor) -> Tensor:
        dtype = torch.promote_types(v.dtype, torch.float32)
        ctx.save_for_backward(v, w)
        return _accumulate(v, w, False, dtype).to(v.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, w = ctx.saved_tensors
        dtype = torch.promote_types(v.dtype, torch.float32)
        dv = _accumulate(grad, w, True, dtype).to(v.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            n, k = v.shape[-2], w.shape[-2]
            taps = torch.zeros(w.shape[0], k, dtype=dtype, device=v.device)  # (h, k)
            for t, rows_out, rows_in in _shifts(n, k):
                for start in range(rows_out.start, rows_out.stop, ROWS):  # blocks of rows
                    stop = min(start + ROWS, rows_out.stop)
                    shift = rows_in.start - rows_out.start
                    prod = grad[..., start:stop, :].to(dtype) * v[..., start + shift:
                                                                  stop + shift, :].to(dtype)
                    taps[:, t] += prod.sum((0, 2, 3))
            dw = taps.reshape(w.shape).to(w.dtype)
        return dv, dw


def depthwise_sequence_conv(v: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(v, weight, padding=(k // 2, 0), groups=h)`` for v ``(b, h, n, d)`` and an
    ``nn.Conv2d(h, h, (k, 1), groups=h)`` weight ``(h, 1, k, 1)``, k odd; see the module
    docstring. Differentiable in v and the weight, twice too (backward is made of
    differentiable ops)."""
    h, k = v.shape[1], weight.shape[-2]
    if weight.shape != (h, 1, k, 1) or k % 2 == 0:
        raise ValueError(f"weight: expected (h={h}, 1, k, 1) with k odd, "
                         f"got {tuple(weight.shape)}")
    if torch.compiler.is_compiling():  # traced (compile/export): the convolution op itself
        return F.conv2d(v, weight, padding=(k // 2, 0), groups=h)  # (no guards on n)
    if torch.is_autocast_enabled(v.device.type):  # as autocast runs F.conv2d: both cast
        dtype = torch.get_autocast_dtype(v.device.type)
        v, weight = v.to(dtype), weight.to(dtype)
    return _SequenceConv.apply(v, weight)
