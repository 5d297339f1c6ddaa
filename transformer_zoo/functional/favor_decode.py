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

``favor_prefill`` starts the state from a whole prompt in one parallel pass (the prompt's outputs
from the parallel causal kernel, the state by one reduction over its keys: g = the max of each
key log-feature over the real keys, S = Σ_j φ̃(k_j) v_jᵀ, z = Σ_j φ̃(k_j)), which equals the
state the steps reach token by token. ``favor_decode_step`` takes a ``key_padding_mask``
``(b, 1)``: a padded token leaves the state as it was. ``performer_attend_cached`` is
``PerformerAttention.attend_cached`` (rotations, prefill or steps).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from transformer_zoo._checks import check_key_padding_mask
from transformer_zoo.functional.favor import (
    _DEFAULT_MAP,
    NumeratorTransform,
    _ratio,
    check_projection,
    compute_dtype,
    favor_attention,
    log_features,
)
from transformer_zoo.functional.feature_maps import FeatureMap
from transformer_zoo.functional.softmax import check_qkv, expand_kv_heads

if TYPE_CHECKING:
    from transformer_zoo.attention.performer import PerformerAttention


@dataclass
class FavorState:
    """Decoding state after ``length`` tokens: S, z and the running key stabiliser g."""

    numerator: Tensor  # (b, h, F, d)   Σ_j e^{log φ(k_j) − g} v_jᵀ (rotated φ in Su's form)
    denominator: Tensor  # (b, h, F)    Σ_j e^{log φ(k_j) − g}
    g: Tensor  # (b, h, F): running max of each key log-feature ((b, h, 1): one scalar)
    length: int = 0  # tokens seen (padded ones included: the next token's position)

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant in ``length``)."""
        return sum(t.numel() * t.element_size() for t in (self.numerator, self.denominator, self.g))

    def index_select(self, index: Tensor) -> FavorState:
        """The state of the batch rows ``index`` (beam search, batch selection)."""
        return replace(self, **{name: getattr(self, name).index_select(0, index.to(self.g.device))
                                for name in ("numerator", "denominator", "g")})


def favor_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    state: FavorState | None = None,
    *,
    feature_map: FeatureMap = _DEFAULT_MAP,
    numerator_transform: NumeratorTransform | None = None,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, FavorState]:
    """One causal step: returns ``(out (b, h, 1, d) in q's dtype, new state)``.

    ``key_padding_mask`` ``(b, 1)``, True = real token: a padded token leaves its row's state
    unchanged (its own output is then that of the state before it).
    """
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
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, b, 1, "key_padding_mask")
        if bool(key_padding_mask.all()):
            key_padding_mask = None
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    autocast = torch.is_autocast_enabled(q.device.type)
    with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
        q, k, v = (_cast(t, dtype) for t in (q, k, v))  # few ops: a step is a few µs of work
        k, v = expand_kv_heads(k, v, h)
        qz, kz = log_features(q, k, projection, feature_map=feature_map, causal=True)
        if key_padding_mask is not None and state is None:  # padded rows start empty
            state = _empty_state(kz[..., 0, :], v, numerator_transform, feature_map)
        kz, qz = kz[..., 0, :], qz[..., 0, :]  # (b, h, F)
        if state is not None:
            scalar = numerator_transform is not None or not feature_map.exponential
            _check_state(state, (b, h, kz.shape[-1], v.shape[-1]), 1 if scalar else kz.shape[-1])
        old = None
        if not feature_map.exponential:  # plain features: no stabiliser
            g = kz.new_zeros(b, h, 1)
            qf, kf = qz, kz
        else:
            g = kz.detach() if numerator_transform is None else \
                kz.detach().amax(-1, keepdim=True)
            qg = qz + g if state is None else None
            if state is not None:
                g_old = _cast(state.g, dtype)
                g = torch.maximum(g_old, g)  # (b, h, F|1)
                qg = qz + g
            # one exp for the three factors (tiny tensors: each op call costs more than its
            # arithmetic): e^{g_old − g} <= 1, φ̃(k) = e^{log φ(k) − g} (largest 1), φ̃(q)
            parts = [kz - g, qg - qg.detach().amax(-1, keepdim=True)]
            if state is not None:
                parts.append(g_old - g)
            f = kz.shape[-1]
            factors = torch.cat(parts, -1).exp_()
            kf, qf = factors[..., :f], factors[..., f:2 * f]
            old = factors[..., 2 * f:] if state is not None else None
        qn, kn = (qf, kf) if numerator_transform is None else (
            t[..., 0, :] for t in numerator_transform(qf[..., None, :], kf[..., None, :]))
        vt = v[..., 0, None, :]  # (b, h, 1, d)
        if state is None:
            num, den = kn[..., :, None] * vt, kf  # (b, h, F, d), (b, h, F)
        else:
            s_old, z_old = _cast(state.numerator, dtype), _cast(state.denominator, dtype)
            if old is not None:
                s_old, z_old = s_old * old[..., :, None], z_old * old
            num = torch.addcmul(s_old, kn[..., :, None], vt)
            den = z_old + kf
        # readout as products and sums (no batched matmul: on tiny shapes its threading
        # costs more than the arithmetic)
        out = _ratio((qn[..., :, None] * num).sum(-2),  # (b, h, d)
                     (qf * den).sum(-1, keepdim=True))[..., None, :]  # (b, h, 1, d)
    length = 1 if state is None else state.length + 1
    new = FavorState(num, den, g, length)
    if key_padding_mask is not None:  # padded rows keep their state
        keep = ~key_padding_mask[:, None, :]  # (b, 1, 1)
        new = FavorState(torch.where(keep[..., None], _cast(state.numerator, dtype), num),
                         torch.where(keep, _cast(state.denominator, dtype), den),
                         torch.where(keep, _cast(state.g, dtype), g), length)
    return _cast(out, out_dtype), new


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _empty_state(kz: Tensor, v: Tensor, transform: NumeratorTransform | None,
                 feature_map: FeatureMap) -> FavorState:
    """No key yet: S = 0, z = 0, g = −inf (the first real key sets it)."""
    b, h, f = kz.shape
    scalar = transform is not None or not feature_map.exponential
    g = kz.new_full((b, h, 1 if scalar else f), float("-inf") if feature_map.exponential else 0.0)
    return FavorState(v.new_zeros(b, h, f, v.shape[-1]), kz.new_zeros(b, h, f), g, 0)


def favor_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    feature_map: FeatureMap = _DEFAULT_MAP,
    numerator_transform: NumeratorTransform | None = None,
    key_padding_mask: Tensor | None = None,
    chunk_size: int = 128,
) -> tuple[Tensor, FavorState]:
    """A whole prompt at once: ``(out (b, h, n, d), state after its n tokens)``.

    ``out`` is ``favor_attention(..., causal=True)`` (the parallel kernel); the state is one
    reduction over the real keys (``key_padding_mask`` ``(b, n)``, True = real token: padded
    keys never enter it), equal to the state ``favor_decode_step`` reaches token by token.
    """
    b, h, n, m, _ = check_qkv(q, k, v)
    if n != m:
        raise ValueError(f"favor_prefill: self-attention over one prompt, expected q and k of "
                         f"the same length, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    out = favor_attention(q, k, v, projection, feature_map=feature_map, causal=True,
                          key_padding_mask=key_padding_mask, chunk_size=chunk_size,
                          numerator_transform=numerator_transform,
                          query_padding_mask=key_padding_mask)
    dtype = compute_dtype(q.dtype)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = expand_kv_heads(k, v, h)
        qz, kz = log_features(q, k, projection, feature_map=feature_map,
                              key_padding_mask=key_padding_mask, causal=True,
                              query_padding_mask=key_padding_mask)
        if not feature_map.exponential:  # plain features (zero at padded keys), no stabiliser
            g, kf = kz.new_zeros(b, h, 1), kz
        else:
            g = kz.amax(-2)  # (b, h, F): the last running max; −inf where no real key
            g = g.amax(-1, keepdim=True) if numerator_transform is not None else g
            kf = (kz - torch.where(torch.isfinite(g), g, 0.0)[..., None, :]).exp()
        kn = kf if numerator_transform is None else numerator_transform(kf, kf)[1]
        state = FavorState(torch.einsum("bhmf,bhmd->bhfd", kn, v), kf.sum(-2), g, n)
    return out, state


def performer_attend_cached(
    attention: PerformerAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: FavorState | None,
    *,
    key_padding_mask: Tensor | None,
    q_positions: Tensor,
    k_positions: Tensor,
) -> tuple[Tensor, FavorState]:
    """``PerformerAttention.attend_cached``: q, k, v ``(b, h, n, d)`` of n new tokens (positions
    ``state.length`` on) -> ``(out (b, h, n, d), state)``. No state: ``favor_prefill``; then
    ``favor_decode_step`` per token, O(F·d) per head and token whatever the length."""
    q, k = attention._rotate_qk(q, k, q_positions, k_positions)
    options = dict(feature_map=attention.feature_map)
    if state is None:
        return favor_prefill(
            q, k, v, attention.projection, key_padding_mask=key_padding_mask,
            numerator_transform=attention._numerator_transform(q_positions, k_positions),
            chunk_size=attention.chunk_size, **options)
    if q.shape[-2] == 1:  # the usual decode step
        return favor_decode_step(
            q, k, v, attention.projection, state, key_padding_mask=key_padding_mask,
            numerator_transform=attention._numerator_transform(q_positions, k_positions),
            **options)
    outs = []
    for i in range(q.shape[-2]):  # later chunks: one step per token
        token = slice(i, i + 1)
        out, state = favor_decode_step(
            q[..., token, :], k[..., token, :], v[..., token, :], attention.projection, state,
            key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, token],
            numerator_transform=attention._numerator_transform(q_positions[..., token],
                                                               k_positions[..., token]),
            **options)
        outs.append(out)
    return torch.cat(outs, -2), state


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
