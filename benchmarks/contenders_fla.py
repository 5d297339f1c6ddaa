"""flash-linear-attention's chunked causal linear attention on our FAVOR+ features.

A like-for-like kernel contender for our causal FAVOR+ scan (``"favor kernel causal
(transformer_zoo)"`` in ``contenders_performer``): the same q, k, v ``(b, h, n, d)`` and the
same W ``(m, d)``; both map q and k with our FAVOR+ features and both divide by the same
denominator. Only the causal prefix sum differs:

- ours: ``favor_attention(q, k, v, W, causal=True)``, whose features are referenced to each
  feature's running max over the keys so far, summed by our chunked scan
  (``transformer_zoo/functional/causal_linear.py``);
- fla: ``favor_features(q, k, W)`` (referenced to each feature's max over all keys, a factor
  that cancels exactly between numerator and denominator), the numerator
  Σ_{j≤i} φ(q_i)ᵀφ(k_j) v_j from ``fla.ops.linear_attn.chunk_linear_attn`` (its Triton
  chunked kernel; ``scale=1``, ``normalize=False``, layout ``(b, n, h, ·)``), the denominator
  φ(q_i)ᵀ Σ_{j≤i} φ(k_j) by a cumulative sum (what fla's own ``normalize`` does), and our rule
  for a zero denominator (output 0; fla adds 1e-10 instead).

Exact in exact arithmetic, so the two agree at moderate norms (tested on the CPU with
``reference_chunk_linear_attn``, a pure-torch stand-in with fla's signature). At large norms
they differ: a key far above the others underflows earlier keys' fla features (all-key
reference), not ours (running reference). Features run in fp32 with autocast off, as ours do.

fla's kernels are Triton: CUDA only. ``unavailable(device)`` says so on other devices, and
says when ``fla`` is not installed (``pip install flash-linear-attention``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.common import CPU, HEAD_DIM, ContenderFactory, Step
from benchmarks.contenders_performer import NB_FEATURES, _qkv
from transformer_zoo.functional import draw_projection, favor_features
from transformer_zoo.functional.favor import compute_dtype

NAME = "favor kernel causal, fla chunk_linear_attn (flash-linear-attention)"

#: ``kernel(q, k, v, *, scale, normalize) -> (o, final_state)``, inputs ``(b, n, h, ·)``.
LinearKernel = Callable[..., tuple[Tensor, Tensor | None]]


def fla_kernel() -> LinearKernel | None:
    """fla's ``chunk_linear_attn`` taking ``(b, n, h, ·)`` inputs, or None without fla."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:  # not installed, or no Triton
        return None
    params = inspect.signature(chunk_linear_attn).parameters
    if "head_first" in params and params["head_first"].default is not False:
        # older fla releases default to (b, h, n, ·): ask for (b, n, h, ·)
        def kernel(q: Tensor, k: Tensor, v: Tensor, **options: object):
            return chunk_linear_attn(q, k, v, head_first=False, **options)

        return kernel
    return chunk_linear_attn


def reference_chunk_linear_attn(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, normalize: bool = True,
    chunk_size: int = 64,
) -> tuple[Tensor, None]:
    """Pure-torch stand-in for ``chunk_linear_attn`` (same signature and layout
    ``(b, n, h, ·)``): o_t = scale · q_t · Σ_{s≤t} k_s v_sᵀ, in chunks of ``chunk_size`` (a
    carried state across chunks, a masked product within); with ``normalize``, divided by
    scale · q_t · Σ_{s≤t} k_s + 1e-10, as fla does. Default scale K^(−1/2), as fla's."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, n, ·)
    n = q.shape[-2]
    state = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])  # (b, h, K, V)
    outs = []
    for start in range(0, n, chunk_size):
        qc, kc, vc = (t[..., start:start + chunk_size, :] for t in (q, k, v))
        c = qc.shape[-2]
        inside = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        scores = (qc @ kc.transpose(-2, -1)).masked_fill(~inside, 0.0)
        outs.append(scale * (qc @ state + scores @ vc))
        state = state + kc.transpose(-2, -1) @ vc
    o = torch.cat(outs, -2)
    if normalize:
        o = o / (scale * (q * k.cumsum(-2)).sum(-1, keepdim=True) + 1e-10)
    return o.transpose(1, 2), None


def favor_on_linear_kernel(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *,
                           kernel: LinearKernel) -> Tensor:
    """Causal FAVOR+ ``(b, h, n, d)`` with the prefix sum done by ``kernel`` (fla's
    ``chunk_linear_attn`` or its stand-in): our features in, our denominator out."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = (t.to(dtype) for t in (q, k, v))
        qf, kf, _ = favor_features(q, k, projection.to(dtype))  # (b, h, n, F), (b, h, m, F)
        num, _ = kernel(*(t.transpose(1, 2) for t in (qf, kf, v)), scale=1.0, normalize=False)
        num = num.transpose(1, 2)  # (b, h, n, d)
        den = (qf * kf.cumsum(-2)).sum(-1, keepdim=True)  # φ(q_i)ᵀ Σ_{j≤i} φ(k_j)
        live = den > 0
        out = torch.where(live, num / torch.where(live, den, 1.0), 0.0)
    return out.to(out_dtype)


def fla_causal_favor(n: int, device: torch.device = CPU) -> Step:
    """The contender: the inputs and W of ``contenders_performer.ours_kernel(causal=True)``."""
    kernel = fla_kernel()
    if kernel is None:
        raise RuntimeError("flash-linear-attention is not installed")
    w = draw_projection(NB_FEATURES, HEAD_DIM, seed=0).to(device)
    q, k, v = _qkv(n, device)
    return lambda: favor_on_linear_kernel(q, k, v, w, kernel=kernel)


def contenders() -> dict[str, ContenderFactory]:
    return {NAME: fla_causal_favor}


def unavailable(device: torch.device) -> dict[str, str]:
    """Why the contender cannot run on ``device`` (empty when it can)."""
    if device.type != "cuda":
        return {NAME: f"flash-linear-attention's kernels are Triton (CUDA only), not run on "
                      f"{device.type}"}
    if fla_kernel() is None:
        return {NAME: "flash-linear-attention is not installed (pip install "
                      "flash-linear-attention)"}
    return {}
