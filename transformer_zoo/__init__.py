"""transformer_zoo: Transformer building blocks that are right, fast and readable."""

from transformer_zoo import functional
from transformer_zoo.attention import MultiHeadAttention, NystromAttention, SoftmaxAttention
from transformer_zoo.compat import check_pair, compatibility_table, supports
from transformer_zoo.encoder import (
    Encoder,
    EncoderConfig,
    EncoderLayer,
    FeedForward,
    SwiGLUFeedForward,
)
from transformer_zoo.positional import (
    InputEncoding,
    LearnedPositionalEncoding,
    LogitBias,
    Place,
    PositionalEncoding,
    QKTransform,
    SinusoidalPositionalEncoding,
)

__version__ = "0.1.0"

__all__ = [
    "Encoder",
    "EncoderConfig",
    "EncoderLayer",
    "FeedForward",
    "InputEncoding",
    "LearnedPositionalEncoding",
    "LogitBias",
    "MultiHeadAttention",
    "NystromAttention",
    "Place",
    "PositionalEncoding",
    "QKTransform",
    "SinusoidalPositionalEncoding",
    "SoftmaxAttention",
    "SwiGLUFeedForward",
    "check_pair",
    "compatibility_table",
    "functional",
    "supports",
    "__version__",
]
