"""LoLCATs' hybrid attention as a multi-head module: sliding-window softmax + linear attention.

    y_i = [γ_h Σ_{j∈W(i)} e^{s_ij − c_i} v_j + λ Σ_{j∉W(i)} φ(q_i)ᵀφ(k_j) v_j]
          / [γ_h Σ_{j∈W(i)} e^{s_ij − c_i}     + λ Σ_{j∉W(i)} φ(q_i)ᵀφ(k_j)],
    s_ij = q_i·k_j/√d,  c_i = max_{j∈W(i)} s_ij,  γ_h = sigmoid(window_factor_h),  λ = 1

Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language Models", arXiv
2410.10254: exact softmax over the w nearest keys, Hedgehog linear attention (Zhang et al.
2024, arXiv 2402.04347) over the rest, one normalizer, a learnable per-head window factor.
Not a pure Performer: the window part is exact softmax attention, only the keys outside it
are approximated, so conversion needs little training. Linear in n (kernel:
``transformer_zoo.functional.hybrid_window``). Shapes: x ``(b, n, d_model)`` ->
``(b, n, d_model)``; inside, q/k/v ``(b, h, n|m, d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int
from transformer_zoo.attention.learned_feature_maps import HedgehogFeatures
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.functional.feature_maps import FeatureMap
from transformer_zoo.functional.feature_maps_optimal import OptimalPositiveFeatures
from transformer_zoo.functional.hybrid_window import hybrid_window_attention
from transformer_zoo.functional.hybrid_window_decode import (
    HybridWindowState,
    hybrid_window_prefill,
    hybrid_window_step,
)
from transformer_zoo.functional.random_features import draw_projection
from transformer_zoo.positional.base import Place, PositionalEncoding


class HybridWindowAttention(MultiHeadAttention):
    """LoLCATs' sliding-window + linear attention; core arguments as ``MultiHeadAttention``,
    plus (keyword-only):

    Args:
        window: w, keys per window. Causal (LoLCATs' form): W(i) = (i − w, i], the linear
            part takes keys j <= i − w. Bidirectional (encoders, e.g. a converted BERT):
            W(i) = {j : |i − j| < w} (2w − 1 keys), the linear part every other key. Cross
            lengths: query i at key index i + m − n. ``window >= n``: exact softmax.
        feature_map: a ``FeatureMap`` spec for the linear part, built per layer as in
            ``PerformerAttention`` (default ``HedgehogFeatures()``, learnable, in
            ``state_dict``); any map works (``T2RFeatures()``, ``PositiveFeatures()``...).
        nb_features: rows r of the random W that random-feature maps read (a buffer,
            ``projection``; Hedgehog and T2R do not read it, T2R takes F = r by default).
        init_window_factor: the per-head logit's start (LoLCATs: 0, so γ = ½).
        affine: λ = 1 − γ instead of 1 (LoLCATs' ``affine_attention_factors``).
        seed, layer: W is ``draw_projection(nb_features, head_dim, seed=seed, layer=layer)``
            (``seed=None``: taken from torch's global generator).
        chunk_size: rows per chunk of the linear part's prefix sum.

    Parameters of its own (what ``linearize``'s stage 1 trains): the map's and
    ``window_factor`` ``(n_heads,)``. ``attn_mask`` is not supported (the window is the
    pattern; use ``mask`` for padding). Causal decoding (``forward_cached``, HF ``generate``)
    keeps a ``HybridWindowState``: the last w − 1 keys and values plus the linear state of
    the keys that left the window, O(w·d + F·d) per head whatever the length; it equals the
    parallel form (``functional/hybrid_window_decode.py``).

    Example:
        >>> import torch
        >>> from transformer_zoo import HybridWindowAttention
        >>> attn = HybridWindowAttention(64, 4, window=8, causal=True)
        >>> attn(torch.randn(2, 20, 64)).shape
        torch.Size([2, 20, 64])
    """

    accepts = frozenset({Place.INPUT, Place.QK})
    supports_causal = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        window: int = 64,
        feature_map: FeatureMap | None = None,
        nb_features: int = 64,
        init_window_factor: float = 0.0,
        affine: bool = False,
        seed: int | None = None,
        layer: int = 0,
        chunk_size: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        positional: PositionalEncoding | None = None,
        kv_dim: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(d_model, n_heads, dropout=dropout, bias=bias, causal=causal,
                         positional=positional, kv_dim=kv_dim, head_dim=head_dim)
        self.window = check_positive_int(window, "window")
        self.nb_features = check_positive_int(nb_features, "nb_features")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        feature_map = HedgehogFeatures() if feature_map is None else feature_map
        if not isinstance(feature_map, FeatureMap):
            raise TypeError(f"feature_map: expected a FeatureMap instance (e.g. "
                            f"HedgehogFeatures(), T2RFeatures()), got {feature_map!r}")
        if causal and isinstance(feature_map, OptimalPositiveFeatures) and feature_map.rho is None:
            raise ValueError(
                "causal HybridWindowAttention with OptimalPositiveFeatures(rho=None): measuring "
                "rho reads every key, future ones included; pass a fixed rho")
        if isinstance(init_window_factor, bool) or not isinstance(init_window_factor,
                                                                  (int, float)):
            raise TypeError(f"init_window_factor: expected a float, got {init_window_factor!r}")
        if not isinstance(affine, bool):
            raise TypeError(f"affine: expected a bool, got {affine!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int or None, got {seed!r}")
        self.affine, self.layer, self._seed = affine, layer, seed
        self.init_window_factor = float(init_window_factor)
        self.register_buffer("projection", draw_projection(self.nb_features, self.head_dim,
                                                           seed=seed, layer=layer))
        self.feature_map = feature_map.build(n_heads=n_heads, head_dim=self.head_dim,
                                             projection=self.projection)
        if not isinstance(self.feature_map, FeatureMap):
            raise TypeError(f"{type(feature_map).__name__}.build returned "
                            f"{type(self.feature_map).__name__}, expected a FeatureMap")
        self.window_factor = nn.Parameter(torch.full((n_heads,), self.init_window_factor))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W redrawn from the seed, window factors back to ``init_window_factor``, the map
        reset (a learnable map's ``reset_parameters``)."""
        self.projection.copy_(draw_projection(self.nb_features, self.head_dim, seed=self._seed,
                                              layer=self.layer))
        self.window_factor.fill_(self.init_window_factor)
        if callable(getattr(self.feature_map, "reset_parameters", None)):
            self.feature_map.reset_parameters()

    @property
    def window_weight(self) -> Tensor:
        """γ = sigmoid(window_factor) per head, ``(n_heads,)``."""
        return torch.sigmoid(self.window_factor)

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
        if attn_mask is not None:
            raise ValueError(
                "HybridWindowAttention does not take attn_mask (the sliding window is its "
                "pattern and the rest is linear attention); use mask= for key padding and "
                "causal=True")
        q, k = self.rotate(q, k, q_positions, k_positions)
        out = hybrid_window_attention(
            q, k, v, self.projection, self.window_factor,
            window=self.window, feature_map=self.feature_map, causal=self.causal,
            affine=self.affine, key_padding_mask=key_padding_mask,
            query_padding_mask=query_padding_mask, chunk_size=self.chunk_size,
        )  # (b, h, n, d)
        p = self.attention_dropout()
        return F.dropout(out, p=p) if p > 0 else out

    def attend_cached(self, q, k, v, cache, *, key_padding_mask, q_positions, k_positions):
        """Causal decoding with a ``HybridWindowState`` (None: prefill the n tokens given)."""
        if not self.causal:
            raise ValueError("attend_cached decodes causal attention; build with causal=True")
        if cache is not None and not isinstance(cache, HybridWindowState):
            raise TypeError(f"cache: expected a HybridWindowState or None, got "
                            f"{type(cache).__name__}")
        q, k = self.rotate(q, k, q_positions, k_positions)
        options = dict(window=self.window, feature_map=self.feature_map, affine=self.affine)
        if cache is None:
            return hybrid_window_prefill(q, k, v, self.projection, self.window_factor,
                                         key_padding_mask=key_padding_mask,
                                         chunk_size=self.chunk_size, **options)
        outs = []
        for i in range(q.shape[-2]):  # one step per new token
            token = slice(i, i + 1)
            out, cache = hybrid_window_step(
                q[..., token, :], k[..., token, :], v[..., token, :], cache, self.projection,
                self.window_factor, key_padding_mask=None if key_padding_mask is None
                else key_padding_mask[:, token], **options)
            outs.append(out)
        return torch.cat(outs, -2), cache

    def extra_repr(self) -> str:
        fm = self.feature_map
        name = type(fm).__name__ if isinstance(fm, nn.Module) else repr(fm)
        return (f"{super().extra_repr()}, window={self.window}, feature_map={name}, "
                f"affine={self.affine}")
