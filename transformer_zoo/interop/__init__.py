"""Bridges into models built elsewhere: ``nn.MultiheadAttention`` users and Hugging Face.

``transformer_zoo.interop.swap_attention`` (torch only) is importable here;
``transformer_zoo.interop.huggingface`` needs the ``hf`` extra and is imported explicitly.
"""

from transformer_zoo.interop.swap import SwapReport, swap_attention
from transformer_zoo.interop.torch import MultiheadAttentionCompat

__all__ = ["MultiheadAttentionCompat", "SwapReport", "swap_attention"]
