"""FAVOR+ attention (Performer): softmax attention through positive random features.

    Att(Q, K, V) ≈ D⁻¹ (Q' (K'ᵀ V)),   D = diag(Q' (K'ᵀ 1)),   Q' = φ(Q̂), K' = φ(K̂),  x̂ = d^(−1/4) x
    causal:  out_i = Σ_{j≤i} φ(q̂_i)ᵀφ(k̂_j) v_j / Σ_{j≤i} φ(q̂_i)ᵀφ(k̂_j)   (a prefix sum)

Choromanski et al. 2021, "Rethinking Attention with Performers", arXiv 2009.14794.
Shapes: b batch, h heads (k/v may have fewer heads: grouped-query), n query length, m key
length, d head dim, r rows of W, F features. q ``(b, h, n, d)``, k/v ``(b, h_kv, m, d)``,
W ``(r, d)`` -> ``(b, h, n, d)``.

Approximate: an unbiased Monte Carlo estimate of the softmax kernel (MSE ~ 1/r). Exact, for a
fixed W: the linear form equals the quadratic form D⁻¹ (Q'K'ᵀ ⊙ M) V (M the causal/padding
mask), including every stabilizer below, which only move factors that cancel:

- features are computed in fp32 (fp64 stays fp64), with autocast disabled;
- query side: log φ(q̂_i) minus its own max over features; exp(−|q̂|²/2) is dropped (it cancels
  and would underflow to 0/0 at the norms of real pretrained models);
- key side, bidirectional: log φ(k̂_j)_f minus c_f, the max of feature f over *valid* keys,
  with c added to log φ(q̂_i) before its per-token max, so the largest term of every
  denominator is exactly 1 (never 0/0, whatever the norms);
- key side, causal: the same per feature, as a *running* max: g_j,f = max of feature f over
  valid keys ≤ j leaves key j and joins query i (the g of the last key i sees) before its
  per-token max; the prefix sum re-references each pair by e^{g_j − g_i} ≤ 1 per feature
  (``causal_linear.py``), so again the largest term of every denominator is exactly 1, and
  no future key can change a past output. Measured against an fp64 log-sum-exp reference
  over per-head norms 1..300: error at fp32's rounding of the log-features themselves
  (|log φ| ~ 6000 at norm 300), as bidirectionally;
- numerator transforms (Su's rotary form) mix features, so there the key max is one scalar
  (over all features, and over all keys or the running keys): it commutes with the
  rotation, but it is exact only while the query's best feature and the keys' are not far
  apart — tested exact at per-head norm 30, while at norm 300 rows underflow to 0;
- padded keys get φ = 0, leaving numerator *and* denominator; no ε is added per feature: a
  zero denominator (no key, or all features underflowed) gives output 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import check_key_padding_mask, check_positive_int, check_rank
from transformer_zoo.functional.causal_linear import causal_linear_scan
from transformer_zoo.functional.favor_causal import (
    causal_favor,
    cummax_rows,
    first_valid,
    stabilized_query,
)
from transformer_zoo.functional.favor_causal_fused import causal_favor_affine
from transformer_zoo.functional.favor_causal_tiled import causal_tiled_favor
from transformer_zoo.functional.favor_fused import FusedFavor
from transformer_zoo.functional.favor_tiled import tiled_favor, worth_tiling
from transformer_zoo.functional.feature_maps import FeatureMap, PositiveFeatures
from transformer_zoo.functional.softmax import check_qkv, expand_kv_heads

#: ``(φ(q), φ(k)) -> (rotated φ(q), rotated φ(k))`` for Su's numerator-only rotary form.
NumeratorTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

_DEFAULT_MAP = PositiveFeatures()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Features run in fp32 for half/bf16 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def check_projection(projection: Tensor, head_dim: int) -> None:
    """W must be a floating ``(nb_features, head_dim)`` tensor (named error, not a matmul's)."""
    check_rank(projection, "projection", 2, "(nb_features, head_dim)")
    if projection.shape[-1] != head_dim:
        raise ValueError(
            f"projection: expected (nb_features, head_dim={head_dim}), "
            f"got {tuple(projection.shape)}"
        )
    if not projection.is_floating_point():
        raise TypeError(f"projection: expected a floating-point tensor, got {projection.dtype}")


def log_features(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    *,
    feature_map: FeatureMap = _DEFAULT_MAP,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    query_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(log φ(q) (b,h,n,F), log φ(k) (b,h,m,F))`` up to per-query constants (features
    themselves for non-exponential maps); padded keys get log φ = −inf (φ = 0)."""
    scale = q.shape[-1] ** -0.25
    w = projection.to(q.dtype)
    q_hat, k_hat = q * scale, k * scale
    feature_map = feature_map.prepare(
        q_hat, k_hat, query_padding_mask=query_padding_mask,
        key_padding_mask=key_padding_mask, causal=causal,
    )
    qz = feature_map(q_hat, w, query=True)  # (b, h, n, F)
    kz = feature_map(k_hat, w, query=False)  # (b, h, m, F)
    if key_padding_mask is not None:
        valid = key_padding_mask[:, None, :, None]  # (b, 1, m, 1)
        kz = kz.masked_fill(~valid, float("-inf")) if feature_map.exponential else kz * valid
    return qz, kz


def running_key_max(kz: Tensor, scalar: bool = False, padded: bool = True) -> Tensor:
    """g_j = max over keys i <= j of log φ(k_i), per feature ``(b, h, m, F)`` (one value over
    all features, ``(b, h, m, 1)``, when ``scalar``), detached. ``padded`` (some keys are
    −inf): before the first valid key g holds that key's value (``first_valid``)."""
    kz = kz.detach()
    kz = kz.amax(-1, keepdim=True) if scalar else kz
    g = cummax_rows(kz)
    return torch.where(torch.isfinite(g), g, first_valid(kz)) if padded else g


def favor_features(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    *,
    feature_map: FeatureMap = _DEFAULT_MAP,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scalar_key_max: bool = False,
    query_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stabilized features: ``(φ(q) (b,h,n,F), φ(k) (b,h,m,F), g)``.

    φ(q) and φ(k) are the textbook features up to factors that cancel. Bidirectional: a
    per-feature key max c_f (valid keys) leaves log φ(k) and joins log φ(q), whose per-token
    max is then removed; ``g`` is zeros ``(b, h, 1, 1)``. Causal: ``g`` ``(b, h, m, F)`` is
    the running max of each feature over valid keys <= j, removed from key j and added to the
    query that sees keys up to j (query i: key i + m − n, bottom-right aligned) before its
    per-token max: the prefix sum re-references each pair with e^{g_j − g_i}. Zeros
    ``(b, h, ·, 1)`` for non-exponential maps. ``scalar_key_max`` uses one value for all
    features (it then commutes with rotations of the features: Su's form). Data-dependent
    maps are fixed first by ``feature_map.prepare`` (real queries and keys).
    """
    qz, kz = log_features(q, k, projection, feature_map=feature_map,
                          key_padding_mask=key_padding_mask, causal=causal,
                          query_padding_mask=query_padding_mask)
    b, h, m, _ = kz.shape
    if not feature_map.exponential:
        return qz, kz, kz.new_zeros(b, h, m if causal else 1, 1)
    if not causal:
        # per-feature key max over valid keys, added back on the query side before the
        # per-token max: the largest term of every denominator is exactly 1 (exact, no 0/0)
        c = kz.detach().amax(-2, keepdim=True)  # (b, h, 1, F)
        c = c.amax(-1, keepdim=True) if scalar_key_max else c
        c = torch.where(torch.isfinite(c), c, 0.0)
        return stabilized_query(qz, c), (kz - c).exp(), kz.new_zeros(b, h, 1, 1)
    g = running_key_max(kz, scalar_key_max, key_padding_mask is not None)  # no future key
    n = qz.shape[-2]
    g_q = g[..., m - n:, :] if m >= n else torch.cat([g[..., :1, :].expand(
        b, h, n - m, g.shape[-1]), g], -2)  # the g of the last key each query sees
    return stabilized_query(qz, g_q), (kz - g).exp(), g


def _tiles_the_map(feature_map: FeatureMap, projection: Tensor, q: Tensor, k: Tensor) -> bool:
    """The map answers ``tile_parameters()`` (it names its tensors), W needs no gradient and
    a feature tensor would be large: the kernels that call the map per tile apply."""
    return not projection.requires_grad and feature_map.tile_parameters() is not None and \
        worth_tiling(q, k, feature_map.num_features(projection.shape[0]))


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with den = 0 -> 0 (no key, or every feature underflowed), never NaN."""
    live = den > 0
    return torch.where(live, num / torch.where(live, den, 1.0), 0.0)


def _linear(qf: Tensor, kf: Tensor, x: Tensor, g: Tensor, causal: bool, chunk: int) -> Tensor:
    if causal:
        return causal_linear_scan(qf, kf, x, g, chunk=chunk)
    return torch.matmul(qf, torch.matmul(kf.transpose(-2, -1), x))  # (b,h,n,F)(b,h,F,Q)


def favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    feature_map: FeatureMap = _DEFAULT_MAP,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    numerator_transform: NumeratorTransform | None = None,
    chunk_size: int = 128,
    query_padding_mask: Tensor | None = None,
) -> Tensor:
    """FAVOR+ attention; see the module docstring. Returns ``(b, h, n, d)`` in q's dtype.

    Args:
        projection: W ``(r, d)`` (e.g. ``draw_projection``).
        feature_map: a ``FeatureMap`` (``PositiveFeatures()`` default).
        causal: query i sees keys j <= i + (m − n) (bottom-right aligned).
        key_padding_mask: ``(b, m)`` bool, True = real token.
        numerator_transform: rotates φ(q), φ(k) in the numerator only (Su et al. 2021,
            RoFormer eq. 19); the denominator keeps the unrotated features.
        chunk_size: rows per chunk of the causal prefix sum.
        query_padding_mask: ``(b, n)`` bool, True = real query; only data-dependent maps
            (``OptimalPositiveFeatures(rho=None)``) read it, to measure ρ on real tokens.
    """
    b, h, n, m, _ = check_qkv(q, k, v)
    check_projection(projection, q.shape[-1])
    if not isinstance(feature_map, FeatureMap):
        raise TypeError(f"feature_map: expected a FeatureMap, got {type(feature_map).__name__}")
    check_positive_int(chunk_size, "chunk_size")
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, b, m, "key_padding_mask")
    if query_padding_mask is not None:
        check_key_padding_mask(query_padding_mask, b, n, "query_padding_mask")
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = expand_kv_heads(k, v, h)
        if not causal and numerator_transform is None:
            scale = q.shape[-1] ** -0.25
            feature_map = feature_map.prepare(
                q * scale, k * scale, query_padding_mask=query_padding_mask,
                key_padding_mask=key_padding_mask, causal=False,
            )
            # fused (favor_fused.py: the same function in tiles, fewer passes) unless W needs ∂W
            affine = None if projection.requires_grad else feature_map.fused_affine(
                projection.to(dtype))
            if affine is not None:
                out = FusedFavor.apply(q, k, v, affine[0], key_padding_mask, *affine[1:])
                return out.to(out_dtype)
            if _tiles_the_map(feature_map, projection, q, k):  # favor_tiled.py: any map
                return tiled_favor(q, k, v, projection.to(dtype), feature_map=feature_map,
                                   key_padding_mask=key_padding_mask).to(out_dtype)
        front, pad_k = (max(m - n, 0), max(n - m, 0)) if causal else (0, 0)
        ones = v.new_ones(*v.shape[:-1], 1)
        if causal and numerator_transform is None:
            scale = q.shape[-1] ** -0.25
            feature_map = feature_map.prepare(
                q * scale, k * scale, query_padding_mask=query_padding_mask,
                key_padding_mask=key_padding_mask, causal=True,
            )
            affine = feature_map.fused_affine(projection.to(dtype)) \
                if feature_map.exponential else None
            tiled = affine is None and _tiles_the_map(feature_map, projection, q, k)
            if affine is not None or tiled:  # favor_causal_fused.py / favor_causal_tiled.py:
                # features formed per tile inside, by the kernel or by the map
                valid = key_padding_mask
                if front:  # align bottom-right: queries without output, dropped
                    q = F.pad(q, (0, 0, front, 0))
                if pad_k:  # ... and keys that are not there
                    k, v = (F.pad(t, (0, 0, pad_k, 0)) for t in (k, v))
                    valid = v.new_ones(b, m, dtype=torch.bool) if valid is None else valid
                    valid = F.pad(valid, (pad_k, 0), value=False)
                out = causal_favor_affine(q, k, v, *affine, valid, chunk=chunk_size) \
                    if affine is not None else causal_tiled_favor(
                        q, k, v, projection.to(dtype), feature_map=feature_map, valid=valid,
                        chunk=chunk_size)
                return out[..., front:, :].to(out_dtype)
        if causal and numerator_transform is None and feature_map.exponential:
            # favor_causal.py: g, φ̃(q), φ̃(k) and the prefix sum per tile of rows, from
            # log-features formed by the map (saved for backward: O(n·F))
            qz, kz = log_features(q, k, projection, feature_map=feature_map,
                                  key_padding_mask=key_padding_mask, causal=True,
                                  query_padding_mask=query_padding_mask)
            if front or pad_k:  # align bottom-right: pad the shorter side at the front
                qz = F.pad(qz, (0, 0, front, 0))  # queries without output, dropped
                kz = F.pad(kz, (0, 0, pad_k, 0), value=float("-inf"))  # φ = 0: no key
                v, ones = (F.pad(t, (0, 0, pad_k, 0)) for t in (v, ones))
            y = causal_favor(qz, kz, torch.cat([v, ones], -1), chunk=chunk_size)
            return _ratio(y[..., :-1], y[..., -1:])[..., front:, :].to(out_dtype)
        qf, kf, g = favor_features(
            q, k, projection, feature_map=feature_map, key_padding_mask=key_padding_mask,
            causal=causal, scalar_key_max=numerator_transform is not None,
            query_padding_mask=query_padding_mask,
        )
        qn, kn = (qf, kf) if numerator_transform is None else numerator_transform(qf, kf)
        if front or pad_k:  # align bottom-right: pad the shorter side at the front
            qf, qn = (F.pad(t, (0, 0, front, 0)) for t in (qf, qn))  # zero queries, dropped
            kf, kn, v, ones = (F.pad(t, (0, 0, pad_k, 0)) for t in (kf, kn, v, ones))  # no key
            g = torch.cat([g[..., :1, :].expand(*g.shape[:2], pad_k, g.shape[-1]), g], -2) \
                if pad_k else g  # stays non-decreasing
        if numerator_transform is None:
            y = _linear(qf, kf, torch.cat([v, ones], -1), g, causal, chunk_size)
            num, den = y[..., :-1], y[..., -1:]
        else:
            num = _linear(qn, kn, v, g, causal, chunk_size)
            den = _linear(qf, kf, ones, g, causal, chunk_size)
        out = _ratio(num, den)[..., front:, :]  # (b, h, n, d)
    return out.to(out_dtype)
