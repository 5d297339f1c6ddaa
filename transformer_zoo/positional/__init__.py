"""Positional encodings; each declares the place it acts (``Place``)."""

from transformer_zoo.functional.rotary import RotaryLayout
from transformer_zoo.positional.alibi import ALiBi
from transformer_zoo.positional.base import (
    FarField,
    FarSide,
    InputEncoding,
    LogitBias,
    Place,
    PositionalEncoding,
    QKTransform,
)
from transformer_zoo.positional.deberta import DebertaRelativeBias, DebertaRelativeEmbeddings
from transformer_zoo.positional.learned import LearnedPositionalEncoding
from transformer_zoo.positional.rope_scaling import (
    DynamicNTKScaling,
    Llama3Scaling,
    LongRoPEScaling,
    RopeScaling,
    YaRNScaling,
)
from transformer_zoo.positional.rotary import RotaryEmbedding
from transformer_zoo.positional.shaw import ShawRelativePosition
from transformer_zoo.positional.sinusoidal import SinusoidalPositionalEncoding
from transformer_zoo.positional.t5 import T5RelativeBias
from transformer_zoo.positional.transformer_xl import TransformerXLRelativePosition
from transformer_zoo.positional.xpos import XPosEmbedding

__all__ = [
    "ALiBi",
    "DebertaRelativeBias",
    "DebertaRelativeEmbeddings",
    "FarField",
    "FarSide",
    "InputEncoding",
    "LearnedPositionalEncoding",
    "LogitBias",
    "Place",
    "PositionalEncoding",
    "QKTransform",
    "RotaryEmbedding",
    "RopeScaling",
    "YaRNScaling",
    "DynamicNTKScaling",
    "Llama3Scaling",
    "LongRoPEScaling",
    "XPosEmbedding",
    "RotaryLayout",
    "ShawRelativePosition",
    "SinusoidalPositionalEncoding",
    "T5RelativeBias",
    "TransformerXLRelativePosition",
]
