"""LoLCATs' hybrid attention: exact softmax over a sliding window + linear attention outside it.

Per head, with s_ij = q_i·k_j/√d, a window W(i) of nearby keys and the keys L(i) outside it,

    y_i = [γ Σ_{j∈W(i)} e^{s_ij − c_i} v_j + λ Σ_{j∈L(i)} φ(q_i)ᵀφ(k_j) v_j]
          / [γ Σ_{j∈W(i)} e^{s_ij − c_i}     + λ Σ_{j∈L(i)} φ(q_i)ᵀφ(k_j)]

    c_i = max_{j∈W(i)} s_ij,   γ = sigmoid(window_factor_h),   λ = 1 (or 1 − γ: ``affine``)

one shared normalizer for both parts. Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of
Large Language Models", arXiv 2410.10254 (sliding-window + linear attention, the
``hybrid_attention_quadratic`` form of HazyResearch/lolcats, whose c_i is the max over the
window's scores only, and whose window factor enters through a sigmoid, 0 at init: γ = ½).
Note that c_i is part of the function, not a stabilizer: the window's weights are scaled so
their largest is γ, the linear part's are φ(q)ᵀφ(k) as they are; gradients flow through c_i.

Windows (keys j, queries i, in index order):

- causal (LoLCATs' standard): W(i) = {j : i − w < j ≤ i},  L(i) = {j : j ≤ i − w};
- bidirectional (encoders): W(i) = {j : |i − j| < w},  L(i) = {j : |i − j| ≥ w};

both bottom-right aligned for m ≠ n (query i sits at key index i + m − n, so a KV-cached
decode step equals the last rows of the full forward; bidirectional cross lengths follow the
same convention).

Padded keys (``key_padding_mask`` False) are in neither part. A row with no key gives 0, never
NaN. ``window ≥ n`` leaves L empty: exactly softmax attention (γ cancels).

Cost, linear in n, never an n × m matrix:

- bidirectional (``hybrid_window_blocks.py``): blocks of w queries against their own and the
  two neighbouring key blocks (dense w × w products, window and linear terms masked), the
  farther blocks through prefix and suffix cumsums of per-block states φ(K)ᵀ[V, 1];
- causal: blocks of w queries against their own and the previous key block (the window's
  pairs masked), and the keys ≤ i − w through the exact chunked prefix sum of
  ``causal_linear.py`` on the keys shifted by w; no "global sum minus the window", which
  would cancel catastrophically when the window holds nearly all the weight.

Blocks have min(w, n) rows (a short input is one block, whatever w); no other Python branch
depends on the length, so ``torch.compile`` with dynamic shapes compiles at most twice (n < w
and n >= w). ``torch.export`` with a dynamic length is not supported (the block count ⌈n / w⌉
is a derived dimension its constraint solver rejects); a static length exports.

Features: ``feature_map`` (a ``FeatureMap``; Hedgehog's learnable map in
``HybridWindowAttention``) on x̂ = d^(−1/4) x as the Performer kernel calls it (query side
``query=True``, key side ``query=False``), in fp32 under autocast (fp64 stays fp64). Exact for
the map's features: exponential maps are stabilised by a key max per feature (causal: the
running max over the keys ≤ i − w, so no future key changes a past output; bidirectional: the
max over the real keys) and a per-query max t_i, whose scale e^{t_i} is multiplied back
before the mixing (both parts scaled by e^{−max(0, t_i)}), so the result is the formula above
to rounding. Caveat: FAVOR+'s random-feature maps drop per-query factors on the query side
(exp(−|q̂|²/2), r^(−1/2)) that cancel in pure linear attention; here they do not cancel, so
with those maps the linear part is a per-query rescaled kernel (Hedgehog, T2R and
``GeneralizedFeatures`` are used as they are).

Shapes: q ``(b, h, n, d)``, k/v ``(b, h_kv, m, d)`` (grouped-query: h_kv divides h), W ``(r, d)``
(read by random-feature maps only), window_factor ``(h,)`` -> ``(b, h, n, d)`` in q's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import check_key_padding_mask, check_positive_int, check_tensor
from transformer_zoo.functional.causal_linear import causal_linear_scan
from transformer_zoo.functional.favor import compute_dtype, log_features, running_key_max
from transformer_zoo.functional.feature_maps import FeatureMap
from transformer_zoo.functional.hybrid_window_blocks import (
    bidirectional_hybrid,
    causal_window_part,
)
from transformer_zoo.functional.softmax import check_qkv, expand_kv_heads


def _shifted(x: Tensor, shift: int, value: float) -> Tensor:
    """Row r of the result is row r − shift of x (``value`` before the start)."""
    n = x.shape[-2]
    return F.pad(x, (0, 0, min(shift, n), 0), value=value)[..., :n, :]  # pad, then slice


def _linear_prefix(lq: Tensor, lk: Tensor, x: Tensor, window: int, exponential: bool,
                   chunk: int) -> tuple[Tensor, Tensor | None]:
    """(Y, t) with e^{t_i} Y_i = Σ_{j ≤ i − w} φ(q_i)ᵀφ(k_j) x_j (t None: plain features)."""
    x = _shifted(x, window, 0.0)
    if not exponential:
        lk = _shifted(lk, window, 0.0)
        zeros = lk.new_zeros(*lk.shape[:-1], 1)
        return causal_linear_scan(lq, lk, x, zeros, chunk=chunk), None
    lk = _shifted(lk, window, float("-inf"))  # padded keys are −inf already: φ = 0
    g = running_key_max(lk, padded=True)  # per feature, over keys ≤ i − w only (detached)
    z = lq + g
    t = z.detach().amax(-1, keepdim=True)  # the per-query scale, multiplied back by the caller
    a, kf = (z - t).exp(), (lk - g).exp()
    return causal_linear_scan(a, kf, x, g, chunk=chunk), t


def hybrid_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    window_factor: Tensor,
    *,
    window: int,
    feature_map: FeatureMap,
    causal: bool = False,
    affine: bool = False,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    chunk_size: int = 128,
) -> Tensor:
    """Sliding-window softmax + linear attention under one normalizer; see the module docstring.

    Args:
        projection: W ``(r, d)`` for random-feature maps (unused by learnable maps).
        window_factor: ``(h,)`` per-head logits, γ = sigmoid(window_factor).
        window: w >= 1; causal W(i) = (i − w, i], bidirectional |i − j| < w (query i at key
            index i + m − n when the lengths differ).
        feature_map: the linear part's φ (a ``FeatureMap``; a learnable one must be built for
            these heads).
        causal: causal windows (bottom-right aligned) instead of bidirectional ones.
        affine: λ = 1 − γ (LoLCATs' ``affine_attention_factors``) instead of 1.
        key_padding_mask: ``(b, m)`` bool, True = real key.
        query_padding_mask: ``(b, n)``, passed to data-dependent maps' ``prepare`` only.
        chunk_size: rows per chunk of the linear part's prefix sum.
    """
    b, h, n, m, _ = check_qkv(q, k, v)
    window = check_positive_int(window, "window")
    check_positive_int(chunk_size, "chunk_size")
    if not isinstance(feature_map, FeatureMap):
        raise TypeError(f"feature_map: expected a FeatureMap, got {type(feature_map).__name__}")
    check_tensor(window_factor, "window_factor")
    if tuple(window_factor.shape) != (h,):
        raise ValueError(f"window_factor: expected shape (heads,) = ({h},), got "
                         f"{tuple(window_factor.shape)}")
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, b, m, "key_padding_mask")
    if query_padding_mask is not None:
        check_key_padding_mask(query_padding_mask, b, n, "query_padding_mask")
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = expand_kv_heads(k, v, h)
        lq, lk = log_features(q, k, projection, feature_map=feature_map,
                              key_padding_mask=key_padding_mask, causal=causal,
                              query_padding_mask=query_padding_mask)
        exponential = feature_map.exponential
        valid = key_padding_mask
        front, pad_k = max(m - n, 0), max(n - m, 0)
        if front:  # query i sits at key index i + m − n: queries without output, dropped
            q, lq = F.pad(q, (0, 0, front, 0)), F.pad(lq, (0, 0, front, 0))
        if pad_k:  # more queries than keys: keys that are not there
            k, v = F.pad(k, (0, 0, pad_k, 0)), F.pad(v, (0, 0, pad_k, 0))
            lk = F.pad(lk, (0, 0, pad_k, 0), value=float("-inf") if exponential else 0.0)
            valid = v.new_ones(b, m, dtype=torch.bool) if valid is None else valid
            valid = F.pad(valid, (pad_k, 0), value=False)
        gamma = torch.sigmoid(window_factor.to(dtype))[:, None, None]  # (h, 1, 1)
        lam = 1 - gamma if affine else 1.0
        if not causal:  # hybrid_window_blocks.py: blocks of w rows, dense matmuls
            out = bidirectional_hybrid(q, k, v, lq, lk, valid, gamma, lam, window, exponential)
            return out[..., front:, :].to(out_dtype)
        part = causal_window_part(q, k, v, valid, window)  # (b, h, n, d + 1)
        parts = [(gamma, part[..., :-1], part[..., -1:], None)]
        # keys <= i − w (none when w >= n: zeros, and the map's parameters still get gradients)
        x = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        y, t = _linear_prefix(lq, lk, x, window, exponential, chunk_size)
        parts.append((lam, y[..., :-1], y[..., -1:], t))
        top = None  # u_i = max(0, t_i...): every part's scale e^{t − u} <= 1
        for *_, t in parts:
            if t is not None:
                top = t.clamp_min(0) if top is None else torch.maximum(top, t)
        num = den = 0.0
        for weight, pn, pd, t in parts:
            if top is not None:
                weight = weight * (-top if t is None else t - top).exp()
            num, den = num + weight * pn, den + weight * pd
        live = den > 0
        out = torch.where(live, num / torch.where(live, den, 1.0), 0.0)[..., front:, :]
    return out.to(out_dtype)

