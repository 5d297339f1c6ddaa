"""transformer_zoo: Transformer building blocks that are right, fast and readable."""

from transformer_zoo import functional, interop, regularizers
from transformer_zoo.attention import (
    HedgehogFeatures,
    LearnedPositiveFeatures,
    MultiHeadAttention,
    NystromAttention,
    PerformerAttention,
    RotaryMode,
    SoftmaxAttention,
    T2RFeatures,
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
from transformer_zoo.functional.feature_maps_optimal import OptimalPositiveFeatures
from transformer_zoo.functional.random_features import RowNorms
from transformer_zoo.positional import (
    ALiBi,
    DynamicNTKScaling,
    InputEncoding,
    LearnedPositionalEncoding,
    Llama3Scaling,
    LogitBias,
    LongRoPEScaling,
    Place,
    PositionalEncoding,
    QKTransform,
    RopeScaling,
    RotaryEmbedding,
    RotaryLayout,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    TransformerXLRelativePosition,
    XPosEmbedding,
    YaRNScaling,
)
from transformer_zoo.regularizers import RDropLoss, SimCSELoss, Whitening

__version__ = "0.1.0"

__all__ = [
    "ALiBi",
    "Encoder",
    "EncoderConfig",
    "EncoderLayer",
    "FeedForward",
    "GeneralizedFeatures",
    "HedgehogFeatures",
    "HyperbolicFeatures",
    "OptimalPositiveFeatures",
    "InputEncoding",
    "LearnedPositionalEncoding",
    "LearnedPositiveFeatures",
    "LogitBias",
    "MultiHeadAttention",
    "NystromAttention",
    "PerformerAttention",
    "Place",
    "PositionalEncoding",
    "PositiveFeatures",
    "QKTransform",
    "RotaryMode",
    "RowNorms",
    "RDropLoss",
    "RotaryEmbedding",
    "RopeScaling",
    "YaRNScaling",
    "DynamicNTKScaling",
    "Llama3Scaling",
    "LongRoPEScaling",
    "XPosEmbedding",
    "RotaryLayout",
    "ShawRelativePosition",
    "SimCSELoss",
    "SinusoidalPositionalEncoding",
    "SoftmaxAttention",
    "SwiGLUFeedForward",
    "T2RFeatures",
    "T5RelativeBias",
    "TransformerXLRelativePosition",
    "Whitening",
    "check_pair",
    "compatibility_table",
    "functional",
    "interop",
    "regularizers",
    "supports",
    "__version__",
]
