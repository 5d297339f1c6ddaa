"""Recurrent (token-by-token) causal FAVOR+: the RNN form of the causal prefix sum.

    S_t = e^{g_(t−1) − g_t} S_(t−1) + φ̃(k_t) v_tᵀ,   z_t = e^{g_(t−1) − g_t} z_(t−1) + φ̃(k_t)
    out_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t,              φ̃(k_t) = exp(log φ(k_t) − g_t)

with g_t the running max of the key log-features (the same stabilizer as the parallel causal
path, so the outputs agree to rounding). Katharopoulos et al. 2020, arXiv 2006.16236;
Choromanski et al. 2021, arXiv 2009.14794. Shapes: q ``(b, h, 1, d)``, k/v
``(b, h_kv, 1, d)``; state S ``(b, h, F, d)``, z ``(b, h, F)``, g ``(b, h)``. Memory O(F·d) per
head, independent of the sequence length. Exact (equal to the parallel causal kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer_zoo.functional.favor import (
    _DEFAULT_MAP,
    NumeratorTransform,
    _ratio,
    compute_dtype,
    favor_features,
)
from transformer_zoo.functional.feature_maps import FeatureMap
from transformer_zoo.functional.softmax import check_qkv, expand_kv_heads


@dataclass
class FavorState:
    """Decoding state after ``length`` tokens: S, z and the running key stabilizer g."""

    numerator: Tensor  # (b, h, F, d)   Σ_j e^{g_j' − g} φ̃(k_j) v_jᵀ (rotated φ in Su's form)
    denominator: Tensor  # (b, h, F)    Σ_j e^{...} φ̃(k_j)
    g: Tensor  # (b, h)
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
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = expand_kv_heads(k, v, h)
        qf, kf, g = favor_features(q, k, projection, feature_map=feature_map, causal=True)
        qn, kn = (qf, kf) if numerator_transform is None else numerator_transform(qf, kf)
        g = g[..., 0]  # (b, h): this key's log-feature max (or 0)
        if state is None:
            num = kn.transpose(-2, -1) @ v  # (b, h, F, d)
            den = kf[..., 0, :]  # (b, h, F)
            length = 1
        else:
            g_new = torch.maximum(state.g.to(dtype), g)
            old, new = (state.g.to(dtype) - g_new).exp(), (g - g_new).exp()  # (b, h), <= 1
            num = state.numerator.to(dtype) * old[..., None, None]
            num = num + (kn.transpose(-2, -1) @ v) * new[..., None, None]
            den = state.denominator.to(dtype) * old[..., None] + kf[..., 0, :] * new[..., None]
            g, length = g_new, state.length + 1
        out = _ratio(qn @ num, (qf * den[..., None, :]).sum(-1, keepdim=True))  # (b, h, 1, d)
    return out.to(out_dtype), FavorState(num, den, g, length)
