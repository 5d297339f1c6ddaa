"""Softmax attention with a positional score modification on FlexAttention.

    O = softmax(score_mod(Q Kᵀ · s) + log M) V,   score_mod(s_ij, b, h, i, j) = s_ij + B_h(i, j)

Dong, Feng, Guessous, Liang, He (PyTorch team) 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels", arXiv 2412.05496; ``torch.nn.attention.flex_attention``.
Exact (the same softmax as ``softmax_attention``); the bias is evaluated per (i, j) inside the
fused kernel, so no ``(b, h, n, m)`` tensor is built. Every ``LogitBias`` encoding that can be
written as a score modification exposes it as ``LogitBias.score_mod(q, k, q_positions,
k_positions)`` (ALiBi, T5, Shaw's logit term); users of FlexAttention can pass that callable
to ``flex_attention`` directly.

On CUDA the call goes through ``torch.compile(flex_attention)`` (Triton, with backward: the
gradient reaches tensors the score_mod captures, e.g. T5's table). On the CPU, torch 2.13's
FlexAttention has no backward, and its eager forward is an unfused reference; the attention
module uses it there only when asked (``SoftmaxAttention(flex=True)``). No dropout.

Shapes: b batch, h query heads, h_kv key/value heads (h_kv divides h), n query length, m key
length, d head dim. q ``(b, h, n, d)``, k ``(b, h_kv, m, d)``, v ``(b, h_kv, m, d_v)`` ->
``(b, h, n, d_v)``; ``mask`` boolean (True = may attend) broadcastable to ``(b, h, n, m)``;
``causal``: bottom-right aligned (key j <= i + m − n). Rows with no key left give 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from transformer_zoo._checks import check_bool_mask, check_broadcastable
from transformer_zoo.functional.softmax import check_qkv

#: ``(score, b, h, q_idx, kv_idx) -> score``, FlexAttention's score_mod signature.
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

_compiled: Callable[..., Tensor] | None = None


def flex_attention_available() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return True


def position_at(positions: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """Inside a score_mod: the position of index ``idx`` of sample ``b``, for int64
    positions ``(n,)`` (shared by the batch) or ``(b, n)``."""
    return positions[idx] if positions.ndim == 1 else positions[b, idx]


def _flex(device: torch.device) -> Callable[..., Tensor]:
    """``flex_attention`` compiled once (CUDA); the plain function inside a compiled region
    or off CUDA (on the CPU it runs its eager reference)."""
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _mask_mod(mask: Tensor | None, causal: bool, n: int, m: int) -> Callable | None:
    """FlexAttention mask_mod for a 4-D broadcastable boolean mask and/or causal rows."""
    if mask is None and not causal:
        return None
    shift = m - n

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = q_idx + shift >= kv_idx if causal else None
        if mask is not None:
            at = [i if size > 1 else 0 for i, size in zip((b, h, q_idx, kv_idx), mask.shape,
                                                          strict=True)]
            allowed = mask[at[0], at[1], at[2], at[3]]
            keep = allowed if keep is None else keep & allowed
        return keep

    return mask_mod


def flex_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    score_mod: ScoreMod | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention on FlexAttention with ``score_mod``; see the module docstring.

    ``scale`` multiplies q·k before ``score_mod`` (default 1/√d). Returns ``(b, h, n, d_v)``.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, n, m, h_kv = check_qkv(q, k, v)
    if mask is not None:
        check_bool_mask(mask, "mask")
        mask = check_broadcastable(mask, "mask", (b, h, n, m), "(b, h, n, m)")
    mask_mod = _mask_mod(mask, causal, n, m)
    block_mask = None
    if mask_mod is not None:
        batch = None if mask is None or mask.shape[0] == 1 else b
        heads = None if mask is None or mask.shape[1] == 1 else h
        block_mask = create_block_mask(mask_mod, batch, heads, n, m, device=q.device)
    out = _flex(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=h_kv != h)
    return out  # type: ignore[return-value]
