"""xPos: RoPE with an exponential decay in the relative distance, a q/k transform.

    q̃_n = ζ^((n − c)/γ) ⊙ R_n q_n,   k̃_m = ζ^(−(m − c)/γ) ⊙ R_m k_m
    ζ_i = (2i/r + 0.4)/1.4,  i = 0 … r/2 − 1   (both channels of pair i get ζ_i)
    so  q̃_nᵀ k̃_m = Σ_i ζ_i^((n − m)/γ) · [pair i of qᵀ R_(m−n) k]   depends on n − m only

Sun, Dong, Patra, Ma, Huang, Benhaim, Chaudhary, Song, Wei 2022, "A Length-Extrapolatable
Transformer", arXiv 2212.10554, §3.2 (eq. 7-9; ζ with γ = 512 as in rotary-embedding-torch's
``use_xpos``, ``xpos_scale_base``). ζ_i < 1, so the logit decays as n − m > 0 grows: xPos is
meant for causal attention; in bidirectional attention keys after the query (m > n) are
amplified by ζ^(−(m−n)/γ) instead.

c is an offset that cancels in every logit and only keeps ζ^(±(p − c)/γ) in floating-point
range (fp32 overflows once |p − c|·ln(1/ζ₀)/γ passes ~88: |p − c| ≈ 36000 at γ = 512;
fp16 at ~11: |p − c| ≈ 4500).
``center=None`` takes the middle of each call's positions, c = lo + (hi − lo + 1) // 2 over
q and k (rotary-embedding-torch's len // 2 for positions 0 … n − 1, so outputs equal
``rotate_queries_and_keys``), which keeps |p − c| within half the span: the scales stay within
fp32 for spans up to ~70000 at γ = 512, within fp16 (max 65504) up to ~9000. Keys scaled in
an earlier call (a KV cache of transformed keys) used a different c: give a fixed integer
``center`` for cached decoding.

Exact rotation (angles exact for every int64 position, as ``RotaryEmbedding``); the scale
exp(((p − c)/γ)·ln ζ_i) is computed in fp64 from the exact integer p − c and rounded once to
fp32, then multiplies cos/sin of the rotated channels only.

Shapes: b batch, h heads, n/m lengths, d head dim, r rotated channels. q ``(b, h, n, d)``,
k ``(b, h_kv, m, d)``, positions int64 ``(n,)`` or ``(b, n)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transformer_zoo.functional.rotary import (
    RotaryLayout,
    _check_even_dim,
    _check_layout,
    apply_rotary_angles,
    check_rotary_input,
    exact_rotary_angles,
)
from transformer_zoo.functional.rotary_theta import _wide
from transformer_zoo.positional.base import QKTransform
from transformer_zoo.positional.rotary import check_rotary_sizes


def xpos_zeta(dim: int) -> list[float]:
    """ζ_i = (2i/r + 0.4)/1.4 = (2i + 0.4 r)/(1.4 r), i = 0 … r/2 − 1 (fp64)."""
    _check_even_dim(dim)
    return [(2 * i + 0.4 * dim) / (1.4 * dim) for i in range(dim // 2)]


class XPosEmbedding(QKTransform):
    """xPos on queries and keys; no parameters. See the module docstring for the equation.

    Args:
        head_dim: channels per head d.
        rotary_dim: rotated (and scaled) channels r, even, <= head_dim (default head_dim).
        base: the θ base of the rotation (10000).
        layout: channel pairing (rotary-embedding-torch uses ``INTERLEAVED``).
        scale_base: γ (512).
        center: the offset c (an int), or None for the middle of each call's positions.

    Example:
        >>> import torch
        >>> from transformer_zoo import XPosEmbedding
        >>> xpos = XPosEmbedding(head_dim=16)
        >>> q = k = torch.randn(1, 2, 8, 16)
        >>> pos = torch.arange(8)
        >>> [t.shape for t in xpos(q, k, pos, pos)]
        [torch.Size([1, 2, 8, 16]), torch.Size([1, 2, 8, 16])]
    """

    def __init__(
        self,
        *,
        head_dim: int,
        rotary_dim: int | None = None,
        base: float = 10000.0,
        layout: RotaryLayout = RotaryLayout.INTERLEAVED,
        scale_base: float = 512.0,
        center: int | None = None,
    ) -> None:
        super().__init__()
        rotary_dim = check_rotary_sizes(head_dim, rotary_dim, base)
        if (isinstance(scale_base, bool) or not isinstance(scale_base, (int, float))
                or not math.isfinite(scale_base) or not scale_base > 0):
            raise ValueError(f"scale_base: expected a finite number > 0, got {scale_base!r}")
        if center is not None and (isinstance(center, bool) or not isinstance(center, int)):
            raise TypeError(f"center: expected an int or None, got {center!r}")
        self._head_dim, self._rotary_dim, self._base = head_dim, rotary_dim, float(base)
        self._layout = _check_layout(layout)
        self._scale_base, self._center = float(scale_base), center
        self._log_zeta = tuple(math.log(z) for z in xpos_zeta(rotary_dim))

    head_dim = property(lambda self: self._head_dim)
    rotary_dim = property(lambda self: self._rotary_dim)
    base = property(lambda self: self._base)
    layout = property(lambda self: self._layout)
    scale_base = property(lambda self: self._scale_base)
    center = property(lambda self: self._center)

    def scales(self, positions: Tensor, center: Tensor | int, *, sign: float = 1.0) -> Tensor:
        """ζ_i^(±(p − c)/γ) (``sign`` ±1: + for queries, − for keys), fp32 ``(n, r/2)`` or
        ``(b, 1, n, r/2)``."""
        wide = _wide(positions.device)
        log_zeta = torch.tensor(self._log_zeta, dtype=wide, device=positions.device)
        power = (positions - center).to(wide) * (sign / self._scale_base)  # exact p − c
        out = (power[..., None] * log_zeta).exp().float()
        return out[:, None] if positions.ndim == 2 else out

    def _center_for(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | int:
        if self._center is not None:
            return self._center
        if not q_positions.numel() or not k_positions.numel():
            return 0
        top = torch.maximum(q_positions.max(), k_positions.max())
        bottom = torch.minimum(q_positions.min(), k_positions.min())
        return bottom + torch.div(top - bottom + 1, 2, rounding_mode="floor")  # no overflow

    def forward(
        self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(ζ^((n−c)/γ) ⊙ R_n q, ζ^(−(m−c)/γ) ⊙ R_m k)."""
        for name, t, p in (("q", q, q_positions), ("k", k, k_positions)):
            check_rotary_input(t, p, self._rotary_dim)
            if t.shape[-1] != self._head_dim:
                raise ValueError(
                    f"{name}: expected head_dim={self._head_dim} channels, got shape "
                    f"{tuple(t.shape)}"
                )
        c = self._center_for(q_positions, k_positions)
        out = []
        for t, p, sign in ((q, q_positions, 1.0), (k, k_positions, -1.0)):
            angles = exact_rotary_angles(p, self._rotary_dim, self._base, 1.0)
            scale = self.scales(p, c, sign=sign)
            out.append(apply_rotary_angles(t, angles, layout=self._layout, scale=scale))
        return out[0], out[1]

    def extra_repr(self) -> str:
        return (
            f"head_dim={self._head_dim}, rotary_dim={self._rotary_dim}, base={self._base:g}, "
            f"layout={self._layout.name}, scale_base={self._scale_base:g}, center={self._center}"
        )
