"""Kernels: plain functions over ``(batch, heads, seq, head_dim)`` tensors."""

from transformer_zoo.functional.masks import causal_mask, merge_masks, padding_to_attn_mask
from transformer_zoo.functional.relative import (
    alibi_bias,
    alibi_slopes,
    relative_positions,
    shaw_relative_index,
    t5_relative_bucket,
)
from transformer_zoo.functional.rotary import (
    RotaryLayout,
    apply_rotary,
    apply_rotary_angles,
    permute_rotary_weight,
    rotary_angles,
    rotary_frequencies,
)
from transformer_zoo.functional.softmax import explicit_softmax_attention, softmax_attention
from transformer_zoo.positional.sinusoidal import sinusoidal_encoding

__all__ = [
    "RotaryLayout",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "apply_rotary_angles",
    "causal_mask",
    "explicit_softmax_attention",
    "merge_masks",
    "padding_to_attn_mask",
    "permute_rotary_weight",
    "relative_positions",
    "rotary_angles",
    "rotary_frequencies",
    "shaw_relative_index",
    "sinusoidal_encoding",
    "softmax_attention",
    "t5_relative_bucket",
]
