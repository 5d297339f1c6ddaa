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
    D_MODEL,
    HEAD_DIM,
    HEADS,
    ContenderFactory,
    Step,
    error_inputs,
    relative_error,
)
from transformer_zoo import SoftmaxAttention
from transformer_zoo.functional import explicit_softmax_attention, softmax_attention


def softmax_attention_module(n: int) -> Step:
    attn = SoftmaxAttention(D_MODEL, HEADS)
    x = torch.randn(BATCH, n, D_MODEL, requires_grad=True)
    return lambda: attn(x)


def torch_multihead_attention(n: int) -> Step:
    attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    x = torch.randn(BATCH, n, D_MODEL, requires_grad=True)
    return lambda: attn(x, x, x, need_weights=False)[0]


def raw_sdpa(n: int) -> Step:
    q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3))
    return lambda: F.scaled_dot_product_attention(q, k, v)


def contenders() -> dict[str, ContenderFactory]:
    return {
        "SoftmaxAttention": softmax_attention_module,
        "nn.MultiheadAttention": torch_multihead_attention,
        "F.sdpa": raw_sdpa,
    }


def errors(n: int) -> dict[str, float]:
    """fp32 rounding floor: our fp32 kernel against the explicit softmax in fp64."""
    q, k, v = error_inputs(n)
    exact, _ = explicit_softmax_attention(q.double(), k.double(), v.double())
    return {"softmax_attention (fp32)": relative_error(softmax_attention(q, k, v), exact)}
