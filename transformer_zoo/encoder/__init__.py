"""The reference encoder."""

from transformer_zoo.encoder.encoder import DecodeState, Encoder, EncoderConfig, EncoderLayer
from transformer_zoo.encoder.feedforward import FeedForward, SwiGLUFeedForward

__all__ = ["DecodeState", "Encoder", "EncoderConfig", "EncoderLayer", "FeedForward",
           "SwiGLUFeedForward"]
