"""Kernels: plain functions over ``(batch, heads, seq, head_dim)`` tensors."""

from transformer_zoo.functional.causal_linear import causal_linear_scan
from transformer_zoo.functional.deberta import (
    deberta_log_bucket,
    deberta_position_index,
    deberta_relative_positions,
    disentangled_bias,
)
from transformer_zoo.functional.favor import favor_attention, favor_features
from transformer_zoo.functional.favor_decode import FavorState, favor_decode_step, favor_prefill
from transformer_zoo.functional.feature_maps import (
    FeatureMap,
    GeneralizedFeatures,
    HyperbolicFeatures,
    PositiveFeatures,
)
from transformer_zoo.functional.feature_maps_optimal import OptimalPositiveFeatures
from transformer_zoo.functional.flex import flex_softmax_attention, position_at
from transformer_zoo.functional.gaussian import (
    gaussian_bhattacharyya,
    gaussian_kl,
    gaussian_wasserstein2,
)
from transformer_zoo.functional.hybrid_window import hybrid_window_attention
from transformer_zoo.functional.masks import causal_mask, merge_masks, padding_to_attn_mask
from transformer_zoo.functional.nystrom import NystromFactors, nystrom_attention
from transformer_zoo.functional.pinv import iterative_pinv, regularized_pinv
from transformer_zoo.functional.random_features import (
    RowNorms,
    draw_projection,
    gaussian_orthogonal_matrix,
)
from transformer_zoo.functional.rdrop import rdrop_mse, symmetric_kl
from transformer_zoo.functional.relative import (
    alibi_bias,
    alibi_slopes,
    relative_positions,
    shaw_relative_index,
    t5_bucket_lookup,
    t5_relative_bucket,
)
from transformer_zoo.functional.rope_scaling import (
    dynamic_ntk_base,
    llama3_frequencies,
    longrope_attention_factor,
    longrope_frequencies,
    yarn_attention_factor,
    yarn_frequencies,
)
from transformer_zoo.functional.rotary import (
    RotaryLayout,
    apply_rotary,
    apply_rotary_angles,
    permute_rotary_weight,
    rotary_angles,
    rotary_frequencies,
)
from transformer_zoo.functional.simcse import simcse_logits, simcse_loss
from transformer_zoo.functional.softmax import explicit_softmax_attention, softmax_attention
from transformer_zoo.functional.softmax_blockwise import blockwise_softmax_attention
from transformer_zoo.functional.transformer_xl import (
    relative_distance_table,
    transformer_xl_bias,
    transformer_xl_sinusoid,
)
from transformer_zoo.positional.sinusoidal import sinusoidal_encoding

__all__ = [
    "deberta_log_bucket",
    "deberta_position_index",
    "deberta_relative_positions",
    "disentangled_bias",
    "causal_linear_scan",
    "draw_projection",
    "favor_attention",
    "favor_decode_step",
    "favor_prefill",
    "favor_features",
    "hybrid_window_attention",
    "FavorState",
    "FeatureMap",
    "gaussian_orthogonal_matrix",
    "GeneralizedFeatures",
    "HyperbolicFeatures",
    "OptimalPositiveFeatures",
    "NystromFactors",
    "PositiveFeatures",
    "RowNorms",
    "RotaryLayout",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "apply_rotary_angles",
    "causal_mask",
    "explicit_softmax_attention",
    "blockwise_softmax_attention",
    "flex_softmax_attention",
    "position_at",
    "gaussian_bhattacharyya",
    "gaussian_kl",
    "gaussian_wasserstein2",
    "iterative_pinv",
    "merge_masks",
    "nystrom_attention",
    "padding_to_attn_mask",
    "permute_rotary_weight",
    "rdrop_mse",
    "regularized_pinv",
    "relative_distance_table",
    "relative_positions",
    "rotary_angles",
    "rotary_frequencies",
    "dynamic_ntk_base",
    "llama3_frequencies",
    "longrope_attention_factor",
    "longrope_frequencies",
    "yarn_attention_factor",
    "yarn_frequencies",
    "shaw_relative_index",
    "simcse_logits",
    "simcse_loss",
    "sinusoidal_encoding",
    "softmax_attention",
    "symmetric_kl",
    "t5_bucket_lookup",
    "t5_relative_bucket",
    "transformer_xl_bias",
    "transformer_xl_sinusoid",
]
