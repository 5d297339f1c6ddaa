"""Kernels: plain functions over ``(batch, heads, seq, head_dim)`` tensors."""

from transformer_zoo.functional.gaussian import (
    gaussian_bhattacharyya,
    gaussian_kl,
    gaussian_wasserstein2,
)
from transformer_zoo.functional.masks import causal_mask, merge_masks, padding_to_attn_mask
from transformer_zoo.functional.rdrop import rdrop_mse, symmetric_kl
from transformer_zoo.functional.simcse import simcse_logits, simcse_loss
from transformer_zoo.functional.softmax import explicit_softmax_attention, softmax_attention
from transformer_zoo.positional.sinusoidal import sinusoidal_encoding

__all__ = [
    "causal_mask",
    "explicit_softmax_attention",
    "gaussian_bhattacharyya",
    "gaussian_kl",
    "gaussian_wasserstein2",
    "merge_masks",
    "padding_to_attn_mask",
    "rdrop_mse",
    "simcse_logits",
    "simcse_loss",
    "sinusoidal_encoding",
    "softmax_attention",
    "symmetric_kl",
]
