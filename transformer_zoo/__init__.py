"""transformer_zoo: Transformer building blocks that are right, fast and readable."""

from transformer_zoo import functional
from transformer_zoo.attention import (
    MultiHeadAttention,
    PerformerAttention,
    RotaryMode,
    SoftmaxAttention,
)
from transformer_zoo.compat import check_pair, compatibility_table, supports
from transformer_zoo.encoder import (
    Encoder,
    EncoderConfig,
    EncoderLayer,
    FeedForward,
    SwiGLUFeedForward,
)
from transformer_zoo.functional.feature_maps import (
    GeneralizedFeatures,
    HyperbolicFeatures,
    PositiveFeatures,
)
from transformer_zoo.functional.random_features import RowNorms
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
    "GeneralizedFeatures",
    "HyperbolicFeatures",
    "InputEncoding",
    "LearnedPositionalEncoding",
    "LogitBias",
    "MultiHeadAttention",
    "PerformerAttention",
    "Place",
    "PositionalEncoding",
    "PositiveFeatures",
    "QKTransform",
    "RotaryMode",
    "RowNorms",
    "SinusoidalPositionalEncoding",
    "SoftmaxAttention",
    "SwiGLUFeedForward",
    "check_pair",
    "compatibility_table",
    "functional",
    "supports",
    "__version__",
]
