"""Nyström attention (module): segment-mean landmarks, regularised pseudoinverse, conv residual.

    head_i = softmax(Q K̃ᵀ/√d) · Z · softmax(Q̃ Kᵀ/√d) · V  +  DepthwiseConv_k(V)
    Z = Moore–Penrose iteration on A = softmax(Q̃ K̃ᵀ/√d)      (pinv_iterations steps), or
    Z = (AᵀA + λ²I)⁻¹ Aᵀ,  λ = pinv_ridge · σ₁(A)              (pinv_iterations=None)
    Q̃, K̃ = segment means of Q, K

Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating
Self-Attention", arXiv 2102.03902. The kernel is ``functional.nystrom_attention``; this module
adds the projections, rotary encodings (applied before the landmarks are formed) and the
optional depthwise convolution over the sequence (one kernel of length ``conv_kernel`` per
head, shared across the head's channels, on V with padded tokens zeroed).

Exact when every sample has at most ``num_landmarks`` real tokens (and ``conv_kernel=None``):
it is then softmax attention. Approximate otherwise. No causal mode (a segment mean mixes
future tokens into every landmark) and no logit biases (there is no n×n logit matrix).
Shapes: x ``(b, n, d_model)`` -> ``(b, n, d_model)``; inside, q/k/v ``(b, h, n, d)``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.functional.nystrom import check_pinv_options, nystrom_attention
from transformer_zoo.functional.nystrom_conv import depthwise_sequence_conv
from transformer_zoo.positional.base import Place, PositionalEncoding


class NystromAttention(MultiHeadAttention):
    """Nyström self-attention; see ``MultiHeadAttention`` for the shared arguments.

    Args:
        num_landmarks: m, landmarks per sample (segment means over each sample's real tokens).
        pinv_iterations: steps of the iterative pseudoinverse (default 6, as in the paper),
            or None for the direct ridge-regularised pseudoinverse. More steps are *not* more
            accurate: they converge to the exact pinv, which amplifies kernel_2's near-singular
            directions (12 steps: a worse pretrained model than 6; docs/nystrom.md).
        pinv_ridge: with ``pinv_iterations=None``, the ridge λ / σ₁(A) (default 0.1, the best
            mean zero-shot on all-MiniLM-L6-v2's selection passages; too strong for smooth
            synthetic inputs); 0 is the exact ``torch.linalg.pinv``, which degrades real
            models badly. Passing it with an int ``pinv_iterations`` raises ValueError.
        conv_kernel: odd length of the depthwise convolution over V added to the output
            (33 in the paper), or None for no convolution. Needs self-attention lengths.

    ``causal=True`` and ``attn_mask`` raise ValueError; key padding goes in ``mask``. For
    self-attention (no ``context``) the padding mask also decides which queries form Q̃.

    Example:
        >>> import torch
        >>> from transformer_zoo import NystromAttention
        >>> attn = NystromAttention(64, 4, num_landmarks=8)
        >>> attn(torch.randn(2, 50, 64)).shape
        torch.Size([2, 50, 64])
    """

    accepts: ClassVar[frozenset[Place]] = frozenset({Place.INPUT, Place.QK})
    supports_causal: ClassVar[bool] = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        num_landmarks: int = 64,
        pinv_iterations: int | None = 6,
        pinv_ridge: float | None = None,
        conv_kernel: int | None = 33,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        positional: PositionalEncoding | None = None,
        kv_dim: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        if causal:
            raise ValueError(
                "NystromAttention does not support causal=True: every segment-mean landmark "
                "mixes later tokens into earlier queries' outputs; use SoftmaxAttention or "
                "PerformerAttention for causal models"
            )
        super().__init__(
            d_model, n_heads, dropout=dropout, bias=bias, causal=causal,
            positional=positional, kv_dim=kv_dim, head_dim=head_dim,
        )
        self.num_landmarks = check_positive_int(num_landmarks, "num_landmarks")
        self.pinv_iterations, self.pinv_ridge = check_pinv_options(pinv_iterations, pinv_ridge)
        self.conv: nn.Conv2d | None = None
        if conv_kernel is not None:
            check_positive_int(conv_kernel, "conv_kernel")
            if conv_kernel % 2 == 0:
                raise ValueError(
                    f"conv_kernel: expected an odd size (an even one changes the sequence "
                    f"length), got {conv_kernel}"
                )
            self.conv = nn.Conv2d(
                n_heads, n_heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0),
                groups=n_heads, bias=False,
            )  # weight (h, 1, k, 1): one kernel per head, shared across the head's channels

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        positions: Tensor | None = None,
        context_positions: Tensor | None = None,
    ) -> Tensor:
        if attn_mask is not None:
            raise ValueError(
                "NystromAttention does not take attn_mask: the landmark factorisation has no "
                "n×n logits to mask; pass key padding as mask=(batch, k_len)"
            )
        if context is not None and self.conv is not None and context.shape[1] != x.shape[1]:
            raise ValueError(
                f"conv_kernel needs keys as long as queries (self-attention): got query length "
                f"{x.shape[1]} and context length {context.shape[1]}; use conv_kernel=None"
            )
        return super().forward(
            x, context=context, mask=mask, positions=positions,
            context_positions=context_positions,
        )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        q_positions: Tensor,
        k_positions: Tensor,
        query_padding_mask: Tensor | None = None,
    ) -> Tensor:
        q, k = self.rotate(q, k, q_positions, k_positions)
        out = nystrom_attention(
            q, k, v,
            num_landmarks=self.num_landmarks,
            key_padding_mask=key_padding_mask,
            query_padding_mask=query_padding_mask,
            pinv_iterations=self.pinv_iterations,
            pinv_ridge=self.pinv_ridge,
            dropout_p=self.attention_dropout(),
        )  # (b, h, n, d)
        if self.conv is not None:
            if key_padding_mask is not None:
                v = v * key_padding_mask[:, None, :, None].to(v.dtype)  # padded values -> 0
            # = out + self.conv(v), without the CPU convolution's copies of V
            # (functional/nystrom_conv.py); self.conv keeps the weight and its state_dict key
            out = out + depthwise_sequence_conv(v, self.conv.weight)  # (b, h, n, d)
        return out

    def extra_repr(self) -> str:
        kernel = None if self.conv is None else self.conv.kernel_size[0]
        return (
            f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, "
            f"pinv_iterations={self.pinv_iterations}, pinv_ridge={self.pinv_ridge}, "
            f"conv_kernel={kernel}"
        )
