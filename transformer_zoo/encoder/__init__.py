"""The reference encoder."""

from transformer_zoo.encoder.encoder import Encoder, EncoderConfig, EncoderLayer
from transformer_zoo.encoder.feedforward import FeedForward, SwiGLUFeedForward

__all__ = ["Encoder", "EncoderConfig", "EncoderLayer", "FeedForward", "SwiGLUFeedForward"]
