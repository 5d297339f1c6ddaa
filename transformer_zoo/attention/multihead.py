"""Multi-head attention: projections, head split/merge, one kernel call, output projection.

    MultiHead(X, C) = Concat(head_1, …, head_h) W^O,   head_i = Kernel(X W_i^Q, C W_i^K, C W_i^V)

Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762, section 3.2.2.

``MultiHeadAttention`` holds the parameters and the plumbing every attention shares; a
subclass supplies ``attend`` (the kernel call on ``(b, h, n, d)`` tensors) and declares which
positional-encoding places it accepts. Every attention class keeps this constructor core and
this forward, so swapping one for another is one line.

Shapes: b batch, n query length, m key length, h heads, d head dim, d_model model width.
x ``(b, n, d_model)``, context ``(b, m, kv_dim)``; output ``(b, n, d_model)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from transformer_zoo._checks import (
    check_bool_mask,
    check_broadcastable,
    check_floating,
    check_key_padding_mask,
    check_nonempty,
    check_param_dtype,
    check_positions,
    check_positive_int,
    check_probability,
    check_rank,
    check_same_device,
)
from transformer_zoo._scripting import refuse_scripting
from transformer_zoo.attention.kv_cache import extend_kv_cache
from transformer_zoo.compat import check_pair
from transformer_zoo.positional.base import LogitBias, Place, PositionalEncoding, QKTransform


class MultiHeadAttention(nn.Module):
    """Base class of every attention module.

    Args:
        d_model: model width of the queries' input and of the output.
        n_heads: number of heads; ``head_dim = d_model // n_heads`` unless given.
        dropout: attention-weight dropout (training only).
        bias: biases in the four projections.
        causal: query i attends only keys j <= i (bottom-right aligned for cross lengths).
        positional: a ``QKTransform`` or ``LogitBias`` encoding applied inside attention;
            rejected with ValueError if this kernel does not accept its place.
        kv_dim: width of ``context`` (defaults to d_model).
        head_dim: per-head width (defaults to d_model // n_heads).

    Forward (all keyword-only after x):
        context: ``(b, m, kv_dim)`` keys/values source; None = self-attention. Checked as x
            is: floating, the parameters' dtype (any dtype autocast casts, under autocast),
            x's device.
        mask: key padding mask ``(b, m)``, True = real token.
        attn_mask: boolean, True = may attend, any shape broadcastable to ``(b, h, n, m)``
            with at most 4 dims, trailing dims aligned: ``(b|1, h|1, n|1, m|1)``, ``(n, m)``,
            ``(m,)`` (per key), 0-d. ``attend`` receives it as a 4-D view.
        positions: int64 ``(n,)`` or ``(b, n)`` query positions (default ``arange(n)``).
        context_positions: int64 key positions (default: ``positions`` for self-attention,
            ``arange(m)`` for cross-attention).
    """

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    #: Positional-encoding places this kernel accepts (the compatibility table reads this).
    accepts: ClassVar[frozenset[Place]] = frozenset(Place)
    #: Whether ``causal=True`` is defined for this kernel.
    supports_causal: ClassVar[bool] = True
    #: An additive ``(b|1, h|1, n, m)`` logit term for the current call only (a float
    #: ``attn_mask`` from ``interop.MultiheadAttentionCompat``); ``logit_bias`` adds it to the
    #: encoding's bias. None outside such a call.
    call_bias: Tensor | None = None

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
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model must be divisible by n_heads: got d_model={d_model}, "
                    f"n_heads={n_heads} (or pass head_dim)"
                )
            head_dim = d_model // n_heads
        check_positive_int(head_dim, "head_dim")
        kv_dim = d_model if kv_dim is None else check_positive_int(kv_dim, "kv_dim")
        if causal and not self.supports_causal:
            raise ValueError(
                f"{type(self).__name__} does not support causal=True; use SoftmaxAttention "
                "or PerformerAttention for causal models"
            )
        if positional is not None:
            check_pair(type(self), positional)
            positional.check_attention(n_heads=n_heads, causal=bool(causal))
        self.d_model, self.n_heads, self.head_dim, self.kv_dim = d_model, n_heads, head_dim, kv_dim
        self.dropout = check_probability(dropout, "dropout")
        self.causal = bool(causal)
        self.positional = positional
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.kv_proj = nn.Linear(kv_dim, 2 * inner, bias=bias)
        self.out_proj = nn.Linear(inner, d_model, bias=bias)
        if positional is not None:
            positional.attach(self)  # after the projections: an encoding may reuse them

    # -- the kernel call: subclasses implement this ------------------------------------------
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
        """q, k, v ``(b, h, n|m, d)`` -> ``(b, h, n, d)``; masks True = may attend.

        ``attn_mask`` is None or 4-D, broadcastable to ``(b, h, n, m)``; ``key_padding_mask``
        is ``(b, m)``.

        ``query_padding_mask`` ``(b, n)`` (True = real query) is given in self-attention, where
        the key padding mask also marks padded queries; kernels that pool over queries
        (Nyström's landmarks) use it, others may ignore it.
        """
        raise NotImplementedError

    # -- decoding: new tokens on a per-layer cache (kv_cache.py) ----------------------------
    def attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, cache: object | None, *,
        key_padding_mask: Tensor | None, q_positions: Tensor, k_positions: Tensor,
    ) -> tuple[Tensor, object]:
        """Causal self-attention of n new tokens on themselves and every token before them:
        q, k, v ``(b, h, n, d)`` (before rotation), ``cache`` the object the previous call
        returned (None first) -> ``(out (b, h, n, d), cache)``; equal to ``attend`` on the
        whole prefix. Default: a growing ``KVCache``; recurrent kernels override this."""
        first = cache is None
        cache = extend_kv_cache(cache, k, v, key_padding_mask=key_padding_mask,
                                k_positions=k_positions)
        out = self.attend(q, cache.keys, cache.values, key_padding_mask=cache.mask,
                          attn_mask=None, q_positions=q_positions, k_positions=cache.positions,
                          query_padding_mask=key_padding_mask if first else None)
        return out, cache

    def forward_cached(
        self, x: Tensor, cache: object | None = None, *, mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, object]:
        """``forward`` for causal decoding: x ``(b, n, d_model)`` new tokens at ``positions``
        (default ``cache.length + arange(n)``), ``mask`` ``(b, n)`` their padding ->
        ``(out (b, n, d_model), cache)``. Prefill with ``cache=None``, then feed tokens."""
        if not self.causal:
            raise ValueError(f"forward_cached decodes causal attention; build "
                             f"{type(self).__name__} with causal=True")
        check_rank(x, "x", 3, "(batch, seq, d_model)")
        check_floating(x, "x")
        check_nonempty(x, "x", "(batch, seq, d_model)")
        b, n, width = x.shape
        if width != self.d_model:
            raise ValueError(f"x: expected last dim d_model={self.d_model}, got {tuple(x.shape)}")
        check_param_dtype(x, "x", self.q_proj.weight.dtype)
        if mask is not None:
            check_key_padding_mask(mask, b, n)
        if positions is None:
            start = 0 if cache is None else int(cache.length)
            positions = torch.arange(start, start + n, device=x.device)
        check_positions(positions, b, n)
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        k, v = rearrange(self.kv_proj(x), "b m (two h d) -> two b h m d", two=2, h=self.n_heads)
        out, cache = self.attend_cached(q, k, v, cache, key_padding_mask=mask,
                                        q_positions=positions, k_positions=positions)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)")), cache

    # -- helpers for subclasses ---------------------------------------------------------------
    def rotate(
        self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Apply a ``QKTransform`` encoding if there is one; otherwise return q, k."""
        if isinstance(self.positional, QKTransform):
            return self.positional(q, k, q_positions, k_positions)
        return q, k

    def logit_bias(
        self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *, k: Tensor | None = None
    ) -> Tensor | None:
        """The ``LogitBias`` encoding's ``(b|1, h, n, m)`` bias plus ``call_bias``, or None.

        Both apply: an additive mask never replaces the encoding (nor a rotary transform).
        ``k`` ``(b, h, m, d)`` reaches encodings with ``needs_keys``.
        """
        bias = None
        pe = self.positional
        if isinstance(pe, LogitBias):
            if pe.needs_keys:
                if k is None:
                    raise ValueError(f"{type(pe).__name__} needs the keys: pass k=")
                bias = pe(q, q_positions, k_positions, k=k)
            else:
                bias = pe(q, q_positions, k_positions)
        if self.call_bias is None:
            return bias
        return self.call_bias if bias is None else bias + self.call_bias

    def attention_dropout(self) -> float:
        return self.dropout if self.training else 0.0

    # -- forward ------------------------------------------------------------------------------
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
        check_rank(x, "x", 3, "(batch, seq, d_model)")
        check_floating(x, "x")
        check_nonempty(x, "x", "(batch, seq, d_model)")
        b, n, width = x.shape
        if width != self.d_model:
            raise ValueError(f"x: expected last dim d_model={self.d_model}, got {tuple(x.shape)}")
        check_same_device("x", x, "the parameters", self.q_proj.weight.device)
        check_param_dtype(x, "x", self.q_proj.weight.dtype)
        self_attention = context is None
        if context is None:
            context = x
        else:  # the same checks as x, against kv_proj
            check_rank(context, "context", 3, "(batch, k_len, kv_dim)")
            check_floating(context, "context")
            check_nonempty(context, "context", "(batch, k_len, kv_dim)")
            if context.shape[0] != b or context.shape[-1] != self.kv_dim:
                raise ValueError(
                    f"context: expected (batch, k_len, kv_dim) = ({b}, *, {self.kv_dim}), "
                    f"got {tuple(context.shape)}"
                )
            check_same_device("context", context, "x", x.device)
            check_param_dtype(context, "context", self.kv_proj.weight.dtype)
        m = context.shape[1]
        if mask is not None:
            check_key_padding_mask(mask, b, m)
            check_same_device("mask", mask, "x", x.device)
        if attn_mask is not None:
            check_bool_mask(attn_mask, "attn_mask")
            check_same_device("attn_mask", attn_mask, "x", x.device)
            # any rank 0..4 (trailing dims aligned); ``attend`` always receives a 4-D view
            attn_mask = check_broadcastable(attn_mask, "attn_mask", (b, self.n_heads, n, m),
                                            "(b, h, n, m)")
        if positions is None:
            positions = torch.arange(n, device=x.device)
        check_positions(positions, b, n)
        check_same_device("positions", positions, "x", x.device)
        if context_positions is None:
            context_positions = positions if self_attention else torch.arange(m, device=x.device)
        check_positions(context_positions, b, m, "context_positions")

        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        k, v = rearrange(self.kv_proj(context), "b m (two h d) -> two b h m d", two=2,
                         h=self.n_heads)
        out = self.attend(
            q, k, v,
            key_padding_mask=mask,
            attn_mask=attn_mask,
            q_positions=positions,
            k_positions=context_positions,
            query_padding_mask=mask if self_attention else None,
        )  # (b, h, n, d)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}, dropout={self.dropout}"
        )
