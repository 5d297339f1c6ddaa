"""Sinusoidal absolute positional encoding (acts on the input).

    PE[p, 2i] = sin(p / 10000^(2i/d)),   PE[p, 2i+1] = cos(p / 10000^(2i/d))

Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762, section 3.5.

For any offset k, PE(p + k) = M_k PE(p) with M_k block-diagonal 2×2 rotations by angles
k / 10000^(2i/d), independent of p. Computed on the fly from int64 positions (angles in fp64,
result rounded to fp32), so any position works (no table, no max length) and the result is the
exact formula to fp32 rounding at every position.

Shapes: positions ``(n,)`` or ``(b, n)`` int64 -> ``(n, d)`` or ``(b, n, d)`` fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int, check_tensor
from transformer_zoo.positional.base import InputEncoding


def sinusoidal_encoding(positions: Tensor, d_model: int, *, base: float = 10000.0) -> Tensor:
    """The table rows for ``positions``: ``(..., n) -> (..., n, d_model)`` in fp32."""
    check_tensor(positions, "positions")
    if positions.dtype != torch.int64:
        raise TypeError(f"positions: expected int64, got dtype {positions.dtype}")
    check_positive_int(d_model, "d_model")
    if d_model % 2:
        raise ValueError(f"d_model: sinusoidal encoding needs an even size, got {d_model}")
    # The angle p·ω is formed in fp64 (fp32 would be off by ~p·2^-24 rad: 0.03 at p = 10^6),
    # then sin/cos are rounded to fp32. MPS has no fp64 and stays in fp32.
    wide = torch.float32 if positions.device.type == "mps" else torch.float64
    exponent = torch.arange(0, d_model, 2, device=positions.device, dtype=wide)
    inv_freq = base ** (-exponent / d_model)  # (d/2,)
    angles = positions.to(wide)[..., None] * inv_freq  # (..., n, d/2)
    # interleave: even columns sin, odd columns cos
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., n, d)
    return pe.to(torch.float32)


class SinusoidalPositionalEncoding(InputEncoding):
    """Fixed sinusoidal encoding added to the input; no parameters, any position.

    Args:
        d_model: model width (even).
        base: the 10000 of the paper.
    """

    def __init__(self, d_model: int, *, base: float = 10000.0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        if d_model % 2:
            raise ValueError(f"d_model: sinusoidal encoding needs an even size, got {d_model}")
        self.d_model = d_model
        self.base = float(base)

    def forward(self, positions: Tensor) -> Tensor:
        return sinusoidal_encoding(positions, self.d_model, base=self.base)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, base={self.base:g}"
