"""Swap any transformer_zoo attention into a model built from ``nn.MultiheadAttention``.

    MultiHead(Q, K, V) = Concat(head_1, …, head_h) W^O,   head_i = Kernel(Q W_i^Q, K W_i^K, V W_i^V)

Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762, section 3.2.2 — the same
equation ``nn.MultiheadAttention`` computes; only ``Kernel`` changes.

``MultiheadAttentionCompat`` takes ``nn.MultiheadAttention``'s call exactly — ``(query, key,
value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)`` ->
``(output, weights or None)`` — and runs the ``MultiHeadAttention`` it wraps (its forward
when keys and values are one tensor, else its projections and ``attend``).
``swap_attention`` (``swap.py``) replaces every ``nn.MultiheadAttention`` in a model with one,
copying the weights. With ``SoftmaxAttention`` the swap is exact (tests: outputs and gradients
of an ``nn.TransformerEncoder`` agree to 1e-5); other kernels are as exact as their
``attend``.

Mask conversion (torch: True = masked out; ours: True = may attend): boolean masks are
inverted; float masks split into blocked entries (-inf or the dtype's lowest value) and a
residual bias, which only kernels accepting ``Place.BIAS`` can take; it is added to the
wrapped module's own positional bias (``MultiHeadAttention.call_bias``), never replaces it. A
mask equal to the causal pattern becomes the kernel's causal flag, so causal-capable kernels
(Performer) run their own causal algorithm. Shapes: N batch, L query length, S key length,
E embed_dim, h heads, d head dim; inside, q/k/v are ``(N, h, L|S, d)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from transformer_zoo._scripting import refuse_scripting
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.attention.softmax import SoftmaxAttention
from transformer_zoo.functional.masks import merge_masks, padding_to_attn_mask
from transformer_zoo.functional.softmax import explicit_softmax_attention
from transformer_zoo.interop._masks import torch_masks
from transformer_zoo.interop.hf_kernels import check_factory
from transformer_zoo.positional.base import Place

AttentionFactory = Callable[..., MultiHeadAttention]


@contextmanager
def _per_call(attention: MultiHeadAttention, causal: bool, bias: Tensor | None) -> Iterator[None]:
    """Set the kernel's causal flag and extra logit bias (``call_bias``, which ``logit_bias``
    adds to the encoding's own) for one call, then restore them."""
    old_causal, old_bias = attention.causal, attention.call_bias
    attention.causal = old_causal or causal
    attention.call_bias = bias
    try:
        yield
    finally:
        attention.causal, attention.call_bias = old_causal, old_bias


class MultiheadAttentionCompat(nn.Module):
    """A drop-in for ``nn.MultiheadAttention`` running a transformer_zoo attention kernel.

    Args:
        attention: a ``MultiHeadAttention`` subclass or factory, called as
            ``attention(embed_dim, num_heads, dropout=..., bias=..., kv_dim=kdim)`` (use
            ``functools.partial`` for kernel options).
        embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first: as ``nn.MultiheadAttention``.
            With ``kdim != vdim`` the wrapped module's ``kv_proj`` projects keys only and this
            module's ``value_proj`` projects values (the kernel is driven through ``attend``).
        path: where this module sits in its model; named in every error message.

    ``need_weights=True`` returns the weights (before dropout) for plain ``SoftmaxAttention``
    and ``None`` for other kernels, which never form them. ``is_causal=True`` without
    ``attn_mask`` applies the causal mask (torch raises there).
    """

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    def __init__(
        self,
        attention: AttentionFactory,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        path: str = "",
    ) -> None:
        super().__init__()
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        self.path = path or type(self).__name__
        check_factory(attention, f"{self.path}: attention")
        inner = attention(embed_dim, num_heads, dropout=dropout, bias=bias, kv_dim=kdim)
        if not isinstance(inner, MultiHeadAttention):
            raise TypeError(
                f"{self.path}: attention must build a transformer_zoo MultiHeadAttention, "
                f"got {type(inner).__name__}"
            )
        self.value_proj: nn.Linear | None = None
        if kdim != vdim:  # keys and values from different widths: one projection each
            width = inner.n_heads * inner.head_dim
            inner.kv_proj = nn.Linear(kdim, width, bias=bias)  # keys only
            self.value_proj = nn.Linear(vdim, width, bias=bias)
        self.attention = inner
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, inner.head_dim
        self.kdim, self.vdim, self.dropout = kdim, vdim, inner.dropout
        self.batch_first = batch_first
        # nn.TransformerEncoderLayer's fused path checks this before touching any weight.
        self._qkv_same_embed_dim = False

    @property
    def in_proj_bias(self) -> Tensor | None:
        """Read by nn.TransformerEncoderLayer's fast-path check (before _qkv_same_embed_dim)."""
        q, kv = self.attention.q_proj.bias, self.attention.kv_proj.bias
        if q is None:
            return None
        return torch.cat([q, kv] if self.value_proj is None else [q, kv, self.value_proj.bias])

    @classmethod
    def from_torch(
        cls, mha: nn.MultiheadAttention, attention: AttentionFactory, *, path: str = ""
    ) -> MultiheadAttentionCompat:
        """Build the replacement for ``mha`` with its weights, device and dtype."""
        name = path or "nn.MultiheadAttention"
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{name}: add_bias_kv / add_zero_attn are not supported")
        weight = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        new = cls(
            attention, mha.embed_dim, mha.num_heads, dropout=mha.dropout,
            bias=mha.in_proj_bias is not None, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, path=name,
        ).to(device=weight.device, dtype=weight.dtype)
        e, inner = mha.embed_dim, new.attention
        if inner.n_heads * inner.head_dim != e:
            raise ValueError(f"{name}: the attention factory changed the head layout")
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                w_q, w_k, w_v = mha.in_proj_weight.split(e)
            else:
                w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            split = new.value_proj is not None
            inner.q_proj.weight.copy_(w_q)
            inner.kv_proj.weight.copy_(w_k if split else torch.cat([w_k, w_v]))
            if split:
                new.value_proj.weight.copy_(w_v)
            inner.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                b_q, b_k, b_v = mha.in_proj_bias.split(e)
                inner.q_proj.bias.copy_(b_q)
                inner.kv_proj.bias.copy_(b_k if split else torch.cat([b_k, b_v]))
                if split:
                    new.value_proj.bias.copy_(b_v)
                inner.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def _check_kernel(self, allowed: Tensor | None, bias: Tensor | None, causal: bool) -> None:
        cls = type(self.attention).__name__
        if causal and not self.attention.supports_causal:
            raise ValueError(f"{self.path}: {cls} does not support causal attention (a causal "
                             "attn_mask or is_causal=True was passed)")
        general = "a float additive mask" if bias is not None else "a non-causal attn_mask"
        if (allowed is not None or bias is not None) and Place.BIAS not in self.attention.accepts:
            traced = (" (under torch.compile / torch.export a causal attn_mask is recognised "
                      "only with is_causal=True)" if torch.compiler.is_compiling() else "")
            raise ValueError(f"{self.path}: {cls} got {general}; it supports only key padding "
                             f"masks and the causal mask{traced}")

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        ranks = (query.dim(), key.dim(), value.dim())
        if ranks not in ((3, 3, 3), (2, 2, 2)):
            raise ValueError(f"{self.path}: expected query, key and value all 3-D (batched) or "
                             f"all 2-D (unbatched), got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        batched = query.dim() == 3
        self_attention, shared_kv = query is key and key is value, key is value
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, e = query.shape
        m = key.shape[1]
        if (e != self.embed_dim or key.shape[:2] != value.shape[:2] or key.shape[0] != b
                or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim):
            raise ValueError(f"{self.path}: expected query (N, L, {self.embed_dim}), key "
                             f"(N, S, {self.kdim}) and value (N, S, {self.vdim}); got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} "
                             "(batch first)")
        kpm, allowed, bias, causal = torch_masks(
            key_padding_mask, attn_mask, is_causal, b, self.num_heads, n, m,
            takes_bias=Place.BIAS in self.attention.accepts, where=self.path)
        self._check_kernel(allowed, bias, causal)

        inner, weights = self.attention, None
        if need_weights and type(inner).attend is SoftmaxAttention.attend and (
                inner.positional is None):
            q, k, v = self._project(query, key, value)
            mask = merge_masks(None if kpm is None else padding_to_attn_mask(kpm), allowed)
            out, weights = explicit_softmax_attention(
                q, k, v, mask=mask, bias=bias, causal=causal or inner.causal,
                dropout_p=inner.attention_dropout(), training=self.training)
            out = inner.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (N, L, E)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights[0]
        elif shared_kv:  # the module's own forward (it may know self- from cross-attention)
            with _per_call(inner, causal, bias):
                out = inner(query, context=None if self_attention else key, mask=kpm,
                            attn_mask=allowed)  # (N, L, E)
        else:  # keys and values are different tensors: our projections, the module's attend
            q, k, v = self._project(query, key, value)
            with _per_call(inner, causal, bias):
                out = inner.attend(q, k, v, key_padding_mask=kpm, attn_mask=allowed,
                                   q_positions=torch.arange(n, device=query.device),
                                   k_positions=torch.arange(m, device=query.device))
            out = inner.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (N, L, E)
        if not batched:
            return out[0], weights
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, L|S, E) inputs -> q, k, v ``(N, h, L|S, d)`` with the wrapped module's weights."""
        inner, h = self.attention, self.num_heads
        if self.value_proj is None:
            w_k, w_v = inner.kv_proj.weight.chunk(2)
            b_k, b_v = (None, None) if inner.kv_proj.bias is None else inner.kv_proj.bias.chunk(2)
            k, v = F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        else:
            k, v = inner.kv_proj(key), self.value_proj(value)
        q = rearrange(inner.q_proj(query), "b n (h d) -> b h n d", h=h)
        k = rearrange(k, "b m (h d) -> b h m d", h=h)
        v = rearrange(v, "b m (h d) -> b h m d", h=h)
        return q, k, v

    def extra_repr(self) -> str:
        return f"path={self.path!r}, batch_first={self.batch_first}"
