"""Kernels: plain functions over ``(batch, heads, seq, head_dim)`` tensors."""

from transformer_zoo.functional.causal_linear import causal_linear_scan
from transformer_zoo.functional.favor import favor_attention, favor_features
from transformer_zoo.functional.favor_decode import FavorState, favor_decode_step
from transformer_zoo.functional.feature_maps import (
    FeatureMap,
    GeneralizedFeatures,
    HyperbolicFeatures,
    PositiveFeatures,
)
from transformer_zoo.functional.masks import causal_mask, merge_masks, padding_to_attn_mask
from transformer_zoo.functional.random_features import (
    RowNorms,
    draw_projection,
    gaussian_orthogonal_matrix,
)
from transformer_zoo.functional.softmax import explicit_softmax_attention, softmax_attention
from transformer_zoo.positional.sinusoidal import sinusoidal_encoding

__all__ = [
    "FavorState",
    "FeatureMap",
    "GeneralizedFeatures",
    "HyperbolicFeatures",
    "PositiveFeatures",
    "RowNorms",
    "causal_linear_scan",
    "draw_projection",
    "favor_attention",
    "favor_decode_step",
    "favor_features",
    "gaussian_orthogonal_matrix",
    "causal_mask",
    "explicit_softmax_attention",
    "merge_masks",
    "padding_to_attn_mask",
    "sinusoidal_encoding",
    "softmax_attention",
]
