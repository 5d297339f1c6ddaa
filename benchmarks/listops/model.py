"""The ListOps classifier: token embedding + positions, ``Encoder``, mean pooling.

LRA's small configuration for ListOps (Tay et al. 2021, arXiv 2011.04006; the same as the
Nyströmformer paper's): 2 layers, d_model 64, feed-forward 128, 2 heads, mean pooling over the
real tokens, a linear head over the 10 classes. The attention is the part that varies.
Positions: sinusoidal by default; learned (a table of ``max_len``), with attention dropout
0.1, in the Nyströmformer paper's LRA code (``LRA_MODEL``).

Shapes: tokens ``(b, n)`` int64 (0 = pad), mask ``(b, n)`` True = real token; logits ``(b, 10)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
)
from transformer_zoo.encoder.encoder import AttentionFactory

from .data import N_CLASSES, PAD_ID, VOCAB


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the classifier (defaults: LRA's ListOps configuration)."""

    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.0
    learned_positions: bool = False
    max_len: int = 2048  # the learned table's length (LRA: 2000 rounded up to 2048)


#: The Nyströmformer paper's LRA ListOps model (``LRA/code/lra_config.py``): learned positions
#: (max_seq_len 2000 -> 2048), dropout and attention dropout 0.1; the sizes are the defaults.
LRA_MODEL = ModelConfig(attention_dropout=0.1, learned_positions=True, max_len=2048)


class ListOpsClassifier(nn.Module):
    """Encoder classifier over ListOps token ids; ``attention`` is a class or factory."""

    def __init__(self, attention: AttentionFactory, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), config.d_model, padding_idx=PAD_ID)
        self.scale = math.sqrt(config.d_model)
        self.encoder = Encoder(
            EncoderConfig(
                d_model=config.d_model,
                n_heads=config.n_heads,
                n_layers=config.n_layers,
                d_ff=config.d_ff,
                dropout=config.dropout,
                attention_dropout=config.attention_dropout,
                attention=attention,
                positional=LearnedPositionalEncoding(config.max_len, config.d_model)
                if config.learned_positions else SinusoidalPositionalEncoding(config.d_model),
            )
        )
        self.head = nn.Linear(config.d_model, N_CLASSES)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(tokens) * self.scale  # (b, n, d_model)
        h = self.encoder(x, mask=mask)  # (b, n, d_model), 0 at padding
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # mean over real tokens
        return self.head(pooled)  # (b, 10)
