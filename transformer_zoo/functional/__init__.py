"""Kernels: plain functions over ``(batch, heads, seq, head_dim)`` tensors."""

from transformer_zoo.functional.masks import causal_mask, merge_masks, padding_to_attn_mask
from transformer_zoo.functional.nystrom import NystromFactors, nystrom_attention
from transformer_zoo.functional.pinv import iterative_pinv
from transformer_zoo.functional.softmax import explicit_softmax_attention, softmax_attention
from transformer_zoo.positional.sinusoidal import sinusoidal_encoding

__all__ = [
    "NystromFactors",
    "causal_mask",
    "explicit_softmax_attention",
    "iterative_pinv",
    "merge_masks",
    "nystrom_attention",
    "padding_to_attn_mask",
    "sinusoidal_encoding",
    "softmax_attention",
]
