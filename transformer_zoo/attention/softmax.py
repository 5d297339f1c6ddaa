"""Standard softmax multi-head attention (module).

    head_i = softmax(Q_i K_iᵀ / √d + B_i) V_i  (+ Σ_j α_ij a^V_ij for encodings with a value term)

Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762. Exact. Runs on
``F.scaled_dot_product_attention``; falls back to the explicit softmax only when an encoding
needs the weights (Shaw's value term).

Accepts every positional-encoding place (input, q/k transform, logit bias) and causal masks.
Shapes: x ``(b, n, d_model)`` -> ``(b, n, d_model)``; inside, q/k/v ``(b, h, n|m, d)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.functional.masks import merge_masks, padding_to_attn_mask
from transformer_zoo.functional.softmax import (
    expand_kv_heads,
    explicit_softmax_attention,
    softmax_attention,
)
from transformer_zoo.positional.base import LogitBias


class SoftmaxAttention(MultiHeadAttention):
    """Exact softmax attention; see ``MultiHeadAttention`` for arguments.

    Example:
        >>> import torch
        >>> from transformer_zoo import SoftmaxAttention
        >>> attn = SoftmaxAttention(64, 4)
        >>> attn(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

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
        mask = merge_masks(
            None if key_padding_mask is None else padding_to_attn_mask(key_padding_mask),
            attn_mask,
        )
        pe = self.positional
        keys = isinstance(pe, LogitBias) and pe.needs_keys
        bias_k = expand_kv_heads(k, v, q.shape[1])[0] if keys else None
        bias = self.logit_bias(q, q_positions, k_positions, k=bias_k)
        scale = pe.logit_scale(q.shape[-1]) if isinstance(pe, LogitBias) else None
        options = dict(mask=mask, bias=bias, causal=self.causal, dropout_p=self.attention_dropout(),
                       scale=scale)
        if isinstance(pe, LogitBias) and pe.has_value_term:
            # The values and the value term must see the same dropped weights (Shaw et al.).
            p = options.pop("dropout_p")
            out, weights = explicit_softmax_attention(q, k, v, training=self.training, **options)
            if p > 0:
                weights = F.dropout(weights, p=p)  # (b, h, n, m), one mask for both terms
                out = weights @ expand_kv_heads(k, v, q.shape[1])[1]
            return out + pe.value_term(weights, q_positions, k_positions)
        return softmax_attention(q, k, v, **options)
