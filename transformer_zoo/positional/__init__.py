"""Positional encodings; each declares the place it acts (``Place``)."""

from transformer_zoo.positional.base import (
    InputEncoding,
    LogitBias,
    Place,
    PositionalEncoding,
    QKTransform,
)
from transformer_zoo.positional.learned import LearnedPositionalEncoding
from transformer_zoo.positional.sinusoidal import SinusoidalPositionalEncoding

__all__ = [
    "InputEncoding",
    "LearnedPositionalEncoding",
    "LogitBias",
    "Place",
    "PositionalEncoding",
    "QKTransform",
    "SinusoidalPositionalEncoding",
]
