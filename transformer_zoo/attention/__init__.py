"""Attention modules: parameters and plumbing around the kernels in ``functional``."""

from transformer_zoo.attention.hybrid_window import HybridWindowAttention
from transformer_zoo.attention.kv_cache import KVCache
from transformer_zoo.attention.learned_feature_maps import (
    HedgehogFeatures,
    LearnedFeatureMap,
    LearnedPositiveFeatures,
    T2RFeatures,
)
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.attention.nystrom import NystromAttention
from transformer_zoo.attention.performer import PerformerAttention, RotaryMode
from transformer_zoo.attention.softmax import SoftmaxAttention

__all__ = [
    "HedgehogFeatures",
    "HybridWindowAttention",
    "KVCache",
    "LearnedFeatureMap",
    "LearnedPositiveFeatures",
    "MultiHeadAttention",
    "NystromAttention",
    "PerformerAttention",
    "RotaryMode",
    "SoftmaxAttention",
    "T2RFeatures",
]
