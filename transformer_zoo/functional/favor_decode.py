"""Recurrent (token-by-token) causal FAVOR+: the RNN form of the causal prefix sum.

    g_t = max(g_(t−1), log φ(k_t))                 (per feature: the running key max)
    S_t = diag(e^{g_(t−1) − g_t}) S_(t−1) + φ̃(k_t) v_tᵀ,   z_t = diag(e^{g_(t−1) − g_t}) z_(t−1)
          + φ̃(k_t),    out_t = φ̃(q_t)ᵀ S_t / φ̃(q_t)ᵀ z_t,
    φ̃(k_t) = e^{log φ(k_t) − g_t},   φ̃(q_t) = e^{log φ(q_t) + g_t − max_f(log φ(q_t) + g_t)}

the same per-feature stabiliser as the parallel causal path (``causal_linear.py``), so the
outputs agree to rounding and stay exact at any norm (every factor <= 1, the largest term of
the denominator exactly 1). With a numerator transform (Su's rotary form) g is one scalar per
head (a per-feature one would not commute with the rotation). Katharopoulos et al. 2020,
arXiv 2006.16236; Choromanski et al. 2021, arXiv 2009.14794. Shapes: q ``(b, h, 1, d)``, k/v
``(b, h_kv, 1, d)``; state S ``(b, h, F, d)``, z ``(b, h, F)``, g ``(b, h, F)`` (``(b, h, 1)``
scalar). Memory O(F·d) per head, independent of the sequence length. Exact (equal to the
parallel causal kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer_zoo.functional.favor import (
    _DEFAULT_MAP,
    NumeratorTransform,
    _ratio,
    check_projection,
    compute_dtype,
    log_features,
    stabilized_query,
)
from transformer_zoo.functional.feature_maps import FeatureMap
from transformer_zoo.functional.softmax import check_qkv, expand_kv_heads


@dataclass
class FavorState:
    """Decoding state after ``length`` tokens: S, z and the running key stabiliser g."""

    numerator: Tensor  # (b, h, F, d)   Σ_j e^{log φ(k_j) − g} v_jᵀ (rotated φ in Su's form)
    denominator: Tensor  # (b, h, F)    Σ_j e^{log φ(k_j) − g}
    g: Tensor  # (b, h, F): running max of each key log-feature ((b, h, 1): one scalar)
    length: int = 0


def favor_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    state: FavorState | None = None,
    *,
    feature_map: FeatureMap = _DEFAULT_MAP,
    numerator_transform: NumeratorTransform | None = None,
) -> tuple[Tensor, FavorState]:
    """One causal step: returns ``(out (b, h, 1, d) in q's dtype, new state)``."""
    b, h, n, _, _ = check_qkv(q, k, v)
    if n != 1 or k.shape[-2] != 1:
        raise ValueError(
            f"favor_decode_step takes one token: expected q, k of length 1, got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )
    check_projection(projection, q.shape[-1])
    if not isinstance(feature_map, FeatureMap):
        raise TypeError(f"feature_map: expected a FeatureMap, got {type(feature_map).__name__}")
    if state is not None and not isinstance(state, FavorState):
        raise TypeError(f"state: expected a FavorState or None, got {type(state).__name__}")
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = expand_kv_heads(k, v, h)
        qz, kz = log_features(q, k, projection, feature_map=feature_map, causal=True)
        kz, qz = kz[..., 0, :], qz[..., 0, :]  # (b, h, F)
        if state is not None:
            scalar = numerator_transform is not None or not feature_map.exponential
            _check_state(state, (b, h, kz.shape[-1], v.shape[-1]), 1 if scalar else kz.shape[-1])
        if not feature_map.exponential:  # plain features: no stabiliser
            g = kz.new_zeros(b, h, 1)
            old = kz.new_ones(b, h, 1)
            qf, kf = qz, kz
        else:
            g = kz.detach() if numerator_transform is None else \
                kz.detach().amax(-1, keepdim=True)
            if state is not None:
                g = torch.maximum(state.g.to(dtype), g)  # (b, h, F|1)
                old = (state.g.to(dtype) - g).exp()  # <= 1
            qf, kf = stabilized_query(qz, g), (kz - g).exp()  # largest term exactly 1
        qn, kn = (qf, kf) if numerator_transform is None else (
            t[..., 0, :] for t in numerator_transform(qf[..., None, :], kf[..., None, :]))
        num = kn[..., :, None] * v[..., 0, None, :]  # (b, h, F, d)
        den = kf
        if state is not None:
            num = num + state.numerator.to(dtype) * old[..., :, None]
            den = den + state.denominator.to(dtype) * old
        out = _ratio(torch.einsum("bhf,bhfd->bhd", qn, num),
                     (qf * den).sum(-1, keepdim=True))[..., None, :]  # (b, h, 1, d)
    length = 1 if state is None else state.length + 1
    return out.to(out_dtype), FavorState(num, den, g, length)


def _check_state(state: FavorState, numerator: tuple[int, ...], g_width: int) -> None:
    """The state must come from steps of the same shapes and feature map."""
    b, h, f, d = numerator
    want = {"numerator": (b, h, f, d), "denominator": (b, h, f), "g": (b, h, g_width)}
    for name, shape in want.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(
                f"state.{name}: expected {shape} for this step's (batch, heads, features, "
                f"head_dim), got {got}; pass the state returned by the previous step"
            )
