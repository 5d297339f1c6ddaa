"""Reference Transformer encoder that composes any attention with any compatible encoding.

Pre-norm:  x ← x + Drop(Attn(LN(x)));  x ← x + Drop(FFN(LN(x)));  final LN
Post-norm: x ← LN(x + Drop(Attn(x)));  x ← LN(x + Drop(FFN(x)))

Vaswani et al. 2017 (arXiv 1706.03762) for post-norm; Xiong et al. 2020 (arXiv 2002.04745)
for pre-norm. The attention and the positional encoding are parts you pass in: an attention
class or factory called as ``attention(d_model, n_heads, dropout=..., causal=...,
positional=...)`` (use ``functools.partial`` for its own options), and a positional encoding
instance (shared by all layers) or a zero-argument factory (one per layer). Every
attention × encoding pair is checked when the encoder is built.

Shapes: x ``(b, n, d_model)``, mask ``(b, n)`` True = real token, positions int64 ``(n,)`` or
``(b, n)``; output ``(b, n, d_model)``. Outputs at padded positions are set to 0.

Causal stacks also decode incrementally: ``prefill(x)`` then ``step(x_t, state)``, one token
(or a chunk) at a time, each layer's attention keeping its own cache in ``DecodeState`` (a
``KVCache`` for softmax and its encodings, FAVOR+'s fixed-size ``FavorState`` for Performer;
``MultiHeadAttention.attend_cached``); token t sits at position t (input encodings and
rotations included). Equal, to rounding, to the parallel forward on the whole prefix (eval
mode: dropout draws differ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from transformer_zoo._checks import (
    check_floating,
    check_key_padding_mask,
    check_nonempty,
    check_positions,
    check_positive_int,
    check_probability,
    check_rank,
    check_same_device,
)
from transformer_zoo._scripting import refuse_scripting
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.attention.softmax import SoftmaxAttention
from transformer_zoo.compat import check_pair
from transformer_zoo.encoder.feedforward import FeedForward
from transformer_zoo.positional.base import InputEncoding, PositionalEncoding

AttentionFactory = Callable[..., MultiHeadAttention]
FeedForwardFactory = Callable[..., nn.Module]
PositionalSpec = PositionalEncoding | Callable[[], PositionalEncoding] | None


@dataclass
class EncoderConfig:
    """Everything that defines an ``Encoder``; parts are objects, never strings.

    Attributes:
        d_model, n_heads, n_layers: sizes.
        d_ff: feed-forward width (default 4 · d_model).
        dropout: residual and embedding dropout.
        attention_dropout: dropout on attention weights.
        norm_first: pre-norm (True) or post-norm (False).
        causal: every attention is causal.
        attention: attention class or factory (default ``SoftmaxAttention``).
        feedforward: ``FeedForward`` (GELU) or ``SwiGLUFeedForward`` or any factory
            ``(d_model, d_ff, *, dropout) -> nn.Module``.
        positional: an encoding instance (shared by all layers), a zero-argument factory (a
            fresh one per layer; input encodings are built once), or None.
        norm_eps: LayerNorm epsilon.
    """

    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    norm_first: bool = True
    causal: bool = False
    attention: AttentionFactory = SoftmaxAttention
    feedforward: FeedForwardFactory = FeedForward
    positional: PositionalSpec = field(default=None)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_positive_int(self.d_model, "d_model")
        check_positive_int(self.n_heads, "n_heads")
        check_positive_int(self.n_layers, "n_layers")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        check_positive_int(self.d_ff, "d_ff")
        check_probability(self.dropout, "dropout")
        check_probability(self.attention_dropout, "attention_dropout")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be divisible by n_heads: got d_model={self.d_model}, "
                f"n_heads={self.n_heads}"
            )
        if not callable(self.attention):
            raise TypeError(f"attention: expected a class or factory, got {self.attention!r}")
        pe = self.positional
        if pe is not None and not isinstance(pe, PositionalEncoding) and not callable(pe):
            raise TypeError(
                "positional: expected a PositionalEncoding instance, a zero-argument factory "
                f"or None, got {type(pe).__name__}"
            )

    def make_positional(self) -> PositionalEncoding | None:
        pe = self.positional
        if pe is None or isinstance(pe, PositionalEncoding):
            return pe
        made = pe()
        if not isinstance(made, PositionalEncoding):
            raise TypeError(
                f"positional factory returned {type(made).__name__}, not a PositionalEncoding"
            )
        return made


class EncoderLayer(nn.Module):
    """One pre- or post-norm block: attention then feed-forward, each with a residual."""

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    def __init__(self, config: EncoderConfig, positional: PositionalEncoding | None) -> None:
        super().__init__()
        inner_pe = None if isinstance(positional, InputEncoding) else positional
        self.attention = config.attention(
            config.d_model,
            config.n_heads,
            dropout=config.attention_dropout,
            causal=config.causal,
            positional=inner_pe,
        )
        if not isinstance(self.attention, MultiHeadAttention):
            raise TypeError(
                "attention factory must build a transformer_zoo MultiHeadAttention, got "
                f"{type(self.attention).__name__}"
            )
        if positional is not None:
            check_pair(type(self.attention), positional)
        self.feedforward = config.feedforward(config.d_model, config.d_ff, dropout=config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def forward_cached(
        self, x: Tensor, cache: Any, *, mask: Tensor | None, positions: Tensor
    ) -> tuple[Tensor, Any]:
        """``forward`` on new tokens with the attention's decoding cache (see ``Encoder.step``)."""
        h = self.norm1(x) if self.norm_first else x
        a, cache = self.attention.forward_cached(h, cache, mask=mask, positions=positions)
        if self.norm_first:
            x = x + self.dropout(a)
            return x + self.dropout(self.feedforward(self.norm2(x))), cache
        x = self.norm1(x + self.dropout(a))
        return self.norm2(x + self.dropout(self.feedforward(x))), cache

    def forward(self, x: Tensor, *, mask: Tensor | None, positions: Tensor) -> Tensor:
        def attn(h: Tensor) -> Tensor:
            return self.dropout(self.attention(h, mask=mask, positions=positions))

        if self.norm_first:
            x = x + attn(self.norm1(x))
            return x + self.dropout(self.feedforward(self.norm2(x)))
        x = self.norm1(x + attn(x))
        return self.norm2(x + self.dropout(self.feedforward(x)))


@dataclass
class DecodeState:
    """An encoder's decoding state: each layer's attention cache and the tokens seen."""

    caches: list[Any]
    length: int = 0

    def nbytes(self) -> int:
        """Bytes held by the per-layer caches."""
        return sum(int(c.nbytes()) for c in self.caches)


class Encoder(nn.Module):
    """A stack of ``EncoderLayer``; see the module docstring.

    Example:
        >>> import torch
        >>> from transformer_zoo import Encoder, EncoderConfig, SinusoidalPositionalEncoding
        >>> enc = Encoder(EncoderConfig(d_model=32, n_heads=4, n_layers=2,
        ...                             positional=SinusoidalPositionalEncoding(32)))
        >>> enc(torch.randn(2, 7, 32), mask=torch.ones(2, 7, dtype=torch.bool)).shape
        torch.Size([2, 7, 32])
    """

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config: expected EncoderConfig, got {type(config).__name__}")
        self.config = config
        first = config.make_positional()
        self.input_encoding = first if isinstance(first, InputEncoding) else None
        layers = []
        for i in range(config.n_layers):
            pe = first if (i == 0 or self.input_encoding is not None) else config.make_positional()
            layers.append(EncoderLayer(config, None if self.input_encoding else pe))
        if self.input_encoding is not None:
            check_pair(type(layers[0].attention), self.input_encoding)
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(config.dropout)
        self.final_norm = (
            nn.LayerNorm(config.d_model, eps=config.norm_eps) if config.norm_first else None
        )

    # -- incremental decoding (causal stacks) ---------------------------------------------
    def prefill(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, DecodeState]:
        """The prompt x ``(b, n, d_model)`` (``mask`` ``(b, n)``, True = real token) in one
        parallel pass: ``(output (b, n, d_model), state)`` for ``step``."""
        return self.step(x, None, mask=mask)

    def step(
        self, x: Tensor, state: DecodeState | None, *, mask: Tensor | None = None
    ) -> tuple[Tensor, DecodeState]:
        """The next token(s) x ``(b, n, d_model)`` (usually n = 1) at positions
        ``state.length …`` -> ``(output (b, n, d_model), new state)``; equal to the last n
        rows of ``forward`` on the whole sequence. Needs ``EncoderConfig(causal=True)``."""
        if not self.config.causal:
            raise ValueError("step/prefill decode causal stacks; build the encoder with "
                             "EncoderConfig(causal=True)")
        if state is not None and not isinstance(state, DecodeState):
            raise TypeError(f"state: expected a DecodeState or None, got {type(state).__name__}")
        x, mask, positions = self._inputs(x, mask, None, 0 if state is None else state.length)
        caches = [None] * len(self.layers) if state is None else state.caches
        new = []
        for layer, cache in zip(self.layers, caches, strict=True):
            x, cache = layer.forward_cached(x, cache, mask=mask, positions=positions)
            new.append(cache)
        return self._output(x, mask), DecodeState(new, positions.shape[-1] + (
            0 if state is None else state.length))

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        x, mask, positions = self._inputs(x, mask, positions, 0)
        for layer in self.layers:
            x = layer(x, mask=mask, positions=positions)
        return self._output(x, mask)

    def _inputs(
        self, x: Tensor, mask: Tensor | None, positions: Tensor | None, start: int
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Checks, positions (default ``start + arange(n)``), input encoding and dropout."""
        check_rank(x, "x", 3, "(batch, seq, d_model)")
        check_floating(x, "x")
        check_nonempty(x, "x", "(batch, seq, d_model)")
        b, n, width = x.shape
        if width != self.config.d_model:
            raise ValueError(
                f"x: expected last dim d_model={self.config.d_model}, got {tuple(x.shape)}"
            )
        check_same_device("x", x, "the parameters", self.layers[0].norm1.weight.device)
        if mask is not None:
            check_key_padding_mask(mask, b, n)
            check_same_device("mask", mask, "x", x.device)
        if positions is None:
            positions = torch.arange(start, start + n, device=x.device)
        check_positions(positions, b, n)
        check_same_device("positions", positions, "x", x.device)
        if self.input_encoding is not None:
            x = x + self.input_encoding(positions).to(x.dtype)
        x = self.dropout(x)
        param_dtype = self.layers[0].norm1.weight.dtype
        if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the parameters are {param_dtype}; "
                "cast one to the other (or use torch.autocast)"
            )
        return x, mask, positions

    def _output(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        if mask is not None:
            x = x * mask[..., None]  # padded positions -> 0
        return x
