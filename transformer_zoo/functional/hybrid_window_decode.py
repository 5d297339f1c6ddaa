"""Token-by-token causal hybrid window attention: the last w − 1 keys plus a linear state.

For the causal hybrid (``hybrid_window.py``; LoLCATs, Zhang et al. 2024, arXiv 2410.10254)
token p attends exactly to keys (p − w, p] and linearly to keys ≤ p − w, so its state is

- the last w − 1 keys, values and key features (the window, with the new token: w keys);
- S = Σ_{j ≤ p − w} e^{log φ(k_j) − g} [v_j, 1]ᵀ ``(F, d + 1)`` per head, g the running max
  of each key log-feature over those keys (plain features: S = Σ φ(k_j) [v_j, 1]ᵀ);

and each step is out_p = [γ Σ_W e^{s_pj − c_p} v_j + λ e^{t_p} φ̃(q_p)ᵀS_v]
/ [γ Σ_W e^{s_pj − c_p} + λ e^{t_p} φ̃(q_p)ᵀS_1] with φ̃(q) = e^{log φ(q) + g − t_p},
t_p = max_f(log φ(q_p) + g) (both parts scaled by e^{−max(0, t_p)}). The key leaving the
window joins S (re-referenced: S ← diag(e^{g_old − g_new}) S + ...). Memory
O(w·(d + F) + F·d) per head, whatever the length; equal (to rounding) to the parallel form.
``hybrid_window_prefill`` starts from a prompt: its outputs from the parallel kernel, the
state from its keys. Shapes: q, k, v ``(b, h, n, d)`` (k/v may have h_kv heads).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from transformer_zoo.functional.favor import compute_dtype, log_features
from transformer_zoo.functional.feature_maps import FeatureMap
from transformer_zoo.functional.hybrid_window import hybrid_window_attention
from transformer_zoo.functional.softmax import expand_kv_heads


@dataclass
class HybridWindowState:
    """Decoding state after ``length`` tokens (padded ones included)."""

    keys: Tensor  # (b, h, c, d): the last c <= w − 1 keys (rotated), oldest first
    values: Tensor  # (b, h, c, d)
    key_features: Tensor  # (b, h, c, F): their log-features (−inf if padded) or features
    mask: Tensor  # (b, c) bool, True = real token
    linear: Tensor  # (b, h, F, d + 1): Σ over the keys that left the window
    g: Tensor  # (b, h, 1, F): running max of their log-features (−inf before the first)
    length: int = 0

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (at most w − 1 keys: constant in ``length``)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def index_select(self, index: Tensor) -> HybridWindowState:
        """The state of the batch rows ``index`` (beam search, batch selection)."""
        return replace(self, **{name: t.index_select(0, index.to(t.device))
                                for name, t in self._tensors().items()})


def _absorb(linear: Tensor, g: Tensor, lk: Tensor, x: Tensor, exponential: bool
            ) -> tuple[Tensor, Tensor]:
    """Keys lk ``(b, h, r, F)`` with [v, 1] = x ``(b, h, r, d + 1)`` join the linear state."""
    if lk.shape[-2] == 0:
        return linear, g
    if not exponential:
        return linear + torch.matmul(lk.transpose(-2, -1), x), g
    g_new = torch.maximum(g, lk.amax(-2, keepdim=True))
    ref = torch.where(torch.isfinite(g_new), g_new, 0.0)
    keep = torch.where(torch.isfinite(g), (g - ref).exp(), 0.0)  # e^{g_old − g_new} <= 1
    linear = linear * keep.transpose(-2, -1) + torch.matmul((lk - ref).exp().transpose(-2, -1),
                                                             x)
    return linear, g_new


def _ones(v: Tensor) -> Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def hybrid_window_prefill(q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                          window_factor: Tensor, *, window: int, feature_map: FeatureMap,
                          affine: bool = False, key_padding_mask: Tensor | None = None,
                          chunk_size: int = 128) -> tuple[Tensor, HybridWindowState]:
    """A prompt's outputs (the parallel causal kernel) and the state after it."""
    out = hybrid_window_attention(q, k, v, projection, window_factor, window=window,
                                  feature_map=feature_map, causal=True, affine=affine,
                                  key_padding_mask=key_padding_mask, chunk_size=chunk_size)
    dtype = compute_dtype(q.dtype)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = expand_kv_heads(k, v, q.shape[1])
        _, lk = log_features(q, k, projection, feature_map=feature_map,
                             key_padding_mask=key_padding_mask, causal=True)
        b, h, n, _ = k.shape
        mask = torch.ones(b, n, dtype=torch.bool, device=k.device) \
            if key_padding_mask is None else key_padding_mask
        left = max(n - (window - 1), 0)  # keys already out of the next token's window
        linear = lk.new_zeros(b, h, lk.shape[-1], v.shape[-1] + 1)
        g = lk.new_full((b, h, 1, lk.shape[-1]), float("-inf"))
        linear, g = _absorb(linear, g, lk[..., :left, :], _ones(v[..., :left, :]),
                            feature_map.exponential)
        state = HybridWindowState(k[..., left:, :], v[..., left:, :], lk[..., left:, :],
                                  mask[:, left:], linear, g, n)
    return out, state


@torch.no_grad()
def hybrid_window_step(q: Tensor, k: Tensor, v: Tensor, state: HybridWindowState,
                       projection: Tensor, window_factor: Tensor, *, window: int,
                       feature_map: FeatureMap, affine: bool = False,
                       key_padding_mask: Tensor | None = None
                       ) -> tuple[Tensor, HybridWindowState]:
    """One token: q, k, v ``(b, h, 1, d)`` (``key_padding_mask`` ``(b, 1)``) -> (out, state)."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = expand_kv_heads(k, v, q.shape[1])
        lq, lk = log_features(q, k, projection, feature_map=feature_map,
                              key_padding_mask=key_padding_mask, causal=True)
        mask = torch.ones(k.shape[0], 1, dtype=torch.bool, device=k.device) \
            if key_padding_mask is None else key_padding_mask
        keys, values = torch.cat([state.keys, k], -2), torch.cat([state.values, v], -2)
        feats, live = torch.cat([state.key_features, lk], -2), torch.cat([state.mask, mask], -1)
        x = _ones(values)
        s = torch.matmul(q * q.shape[-1] ** -0.5, keys.transpose(-2, -1))  # (b, h, 1, w)
        s = s.masked_fill(~live[:, None, None, :], float("-inf"))
        top = s.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)
        window_part = torch.matmul((s - top).exp(), x)  # (b, h, 1, d + 1)
        gamma = torch.sigmoid(window_factor.to(dtype))[:, None, None]
        lam = 1 - gamma if affine else 1.0
        if feature_map.exponential:
            z = lq + torch.where(torch.isfinite(state.g), state.g, 0.0)
            t = z.amax(-1, keepdim=True)
            u = t.clamp_min(0)
            lin = torch.matmul((z - t).exp(), state.linear)
            y = gamma * (-u).exp() * window_part + lam * (t - u).exp() * lin
        else:
            y = gamma * window_part + lam * torch.matmul(lq, state.linear)
        den = y[..., -1:]
        out = torch.where(den > 0, y[..., :-1] / torch.where(den > 0, den, 1.0), 0.0)
        linear, g = state.linear, state.g
        if keys.shape[-2] >= window:  # the oldest key leaves the next token's window
            linear, g = _absorb(linear, g, feats[..., :1, :], x[..., :1, :],
                                feature_map.exponential)
            keys, values, feats, live = (keys[..., 1:, :], values[..., 1:, :],
                                         feats[..., 1:, :], live[:, 1:])
    return out.to(out_dtype), HybridWindowState(keys, values, feats, live, linear, g,
                                                state.length + 1)
