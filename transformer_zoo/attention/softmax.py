"""Standard softmax multi-head attention (module).

    head_i = softmax(Q_i K_iᵀ / √d + B_i) V_i  (+ Σ_j α_ij a^V_ij for encodings with a value term)

Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762. Exact. Runs on
``F.scaled_dot_product_attention``; falls back to the explicit softmax only when an encoding
needs the weights (Shaw's value term).

Long inputs with a logit-bias encoding (T5, ALiBi, Shaw, …) never build the ``(b, h, n, m)``
bias: past ``LONG_BIAS_ELEMENTS`` bias elements (or with ``blockwise=True``) the attention runs
on CUDA through FlexAttention with the encoding's ``score_mod`` where it has one (and no value
term, dropout or additive mask needs the weights), otherwise through the exact blockwise kernel
(``functional.blockwise_softmax_attention``). Both equal the materialised form.

Accepts every positional-encoding place (input, q/k transform, logit bias) and causal masks.
Shapes: x ``(b, n, d_model)`` -> ``(b, n, d_model)``; inside, q/k/v ``(b, h, n|m, d)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import check_positive_int
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.functional.flex import flex_attention_available, flex_softmax_attention
from transformer_zoo.functional.masks import merge_masks, padding_to_attn_mask
from transformer_zoo.functional.softmax import (
    expand_kv_heads,
    explicit_softmax_attention,
    softmax_attention,
)
from transformer_zoo.functional.softmax_blockwise import blockwise_softmax_attention
from transformer_zoo.positional.base import LogitBias, PositionalEncoding

#: ``blockwise=None``: a logit-bias attention with more than this many bias elements
#: (b · h · n · m; 2^24 fp32 = 64 MiB, e.g. 8 heads at n = m = 1449) leaves the materialised
#: path for the FlexAttention / blockwise one.
LONG_BIAS_ELEMENTS = 2**24


class SoftmaxAttention(MultiHeadAttention):
    """Exact softmax attention; see ``MultiHeadAttention`` for the shared arguments.

    Args (keyword-only, besides ``MultiHeadAttention``'s):
        blockwise: how a ``LogitBias`` encoding's bias is applied. None (default): by size,
            the materialised ``(b, h, n, m)`` bias up to ``LONG_BIAS_ELEMENTS`` elements, the
            long path above; True: always the long path; False: always materialised.
        block_size: query rows per block of the blockwise kernel (default: sized so one
            block's bias has ``functional.softmax_blockwise.BLOCK_ELEMENTS`` elements).
        flex: on the long path, FlexAttention with the encoding's ``score_mod``. None
            (default): on CUDA when it applies (the encoding has a ``score_mod``, no value
            term, no dropout, no additive ``call_bias``); False: never (blockwise only);
            True: wherever it applies, on any device (FlexAttention's CPU forward is an
            unfused reference without backward; for tests).

    Example:
        >>> import torch
        >>> from transformer_zoo import SoftmaxAttention
        >>> attn = SoftmaxAttention(64, 4)
        >>> attn(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        positional: PositionalEncoding | None = None,
        kv_dim: int | None = None,
        head_dim: int | None = None,
        blockwise: bool | None = None,
        block_size: int | None = None,
        flex: bool | None = None,
    ) -> None:
        super().__init__(d_model, n_heads, dropout=dropout, bias=bias, causal=causal,
                         positional=positional, kv_dim=kv_dim, head_dim=head_dim)
        for name, value in (("blockwise", blockwise), ("flex", flex)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name}: expected True, False or None, got {value!r}")
        self.blockwise = blockwise
        self.block_size = None if block_size is None else check_positive_int(block_size,
                                                                             "block_size")
        self.flex = flex

    def long_bias_path(self, q: Tensor, k: Tensor) -> bool:
        """Whether this call's ``LogitBias`` skips the materialised bias (see ``blockwise``)."""
        if not isinstance(self.positional, LogitBias) or self.blockwise is False:
            return False
        if self.blockwise:
            return True
        b, h, n, _ = q.shape
        return b * h * n * k.shape[-2] > LONG_BIAS_ELEMENTS

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
        if isinstance(pe, LogitBias) and self.long_bias_path(q, k):
            return self._long_bias(q, k, v, pe, mask, q_positions, k_positions)
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

    def _long_bias(self, q: Tensor, k: Tensor, v: Tensor, pe: LogitBias, mask: Tensor | None,
                   q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """FlexAttention with ``pe.score_mod`` where it applies, else the blockwise kernel."""
        p = self.attention_dropout()
        flex = self.flex if self.flex is not None else q.is_cuda
        if flex and p == 0 and self.call_bias is None and not pe.has_value_term and (
                flex_attention_available()):
            k_full = expand_kv_heads(k, v, q.shape[1])[0] if pe.needs_keys else k
            score_mod = pe.score_mod(q, k_full, q_positions, k_positions)
            if score_mod is not None:
                return flex_softmax_attention(q, k, v, score_mod=score_mod, mask=mask,
                                              causal=self.causal,
                                              scale=pe.logit_scale(q.shape[-1]))
        return blockwise_softmax_attention(
            q, k, v, positional=pe, q_positions=q_positions, k_positions=k_positions,
            mask=mask, bias=self.call_bias, causal=self.causal, dropout_p=p,
            block_size=self.block_size,
        )

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)}" for name in
                        ("blockwise", "block_size", "flex") if getattr(self, name) is not None)
        return super().extra_repr() + extra
