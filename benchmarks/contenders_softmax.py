"""Exact softmax attention contenders: ours, ``nn.MultiheadAttention`` and raw SDPA.

``SoftmaxAttention`` and ``nn.MultiheadAttention`` are whole self-attention modules
(projections in, output projection out); ``F.scaled_dot_product_attention`` is the bare kernel
on ``(b, h, n, d)`` inputs with no projections, a floor for the other two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    BATCH,
    CPU,
    D_MODEL,
    HEAD_DIM,
    HEADS,
    ContenderFactory,
    Step,
    error_inputs,
    randn,
    relative_error,
)
from benchmarks.device import SHORT_NAMES
from transformer_zoo import SoftmaxAttention
from transformer_zoo.functional import explicit_softmax_attention, softmax_attention


def softmax_attention_module(n: int, device: torch.device = CPU) -> Step:
    attn = SoftmaxAttention(D_MODEL, HEADS).to(device)
    x = randn(BATCH, n, D_MODEL, device=device, requires_grad=True)
    return lambda: attn(x)


def torch_multihead_attention(n: int, device: torch.device = CPU) -> Step:
    attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True).to(device)
    x = randn(BATCH, n, D_MODEL, device=device, requires_grad=True)
    return lambda: attn(x, x, x, need_weights=False)[0]


def raw_sdpa(n: int, device: torch.device = CPU) -> Step:
    q, k, v = (randn(BATCH, HEADS, n, HEAD_DIM, device=device, requires_grad=True)
               for _ in range(3))
    return lambda: F.scaled_dot_product_attention(q, k, v)


def contenders() -> dict[str, ContenderFactory]:
    return {
        "SoftmaxAttention": softmax_attention_module,
        "nn.MultiheadAttention": torch_multihead_attention,
        "F.sdpa": raw_sdpa,
    }


def errors(n: int, device: torch.device = CPU, dtype: torch.dtype = torch.float32
           ) -> dict[str, float]:
    """Rounding floor: our kernel on ``dtype`` inputs against the explicit softmax in fp64."""
    q, k, v = error_inputs(n, device=device)
    exact, _ = explicit_softmax_attention(q.double(), k.double(), v.double())
    name = f"softmax_attention ({SHORT_NAMES[dtype]})"
    with torch.no_grad():
        out = softmax_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    return {name: relative_error(out, exact)}
