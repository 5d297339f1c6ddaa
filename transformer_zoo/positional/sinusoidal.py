"""Sinusoidal absolute positional encoding (acts on the input).

    PE[p, 2i] = sin(p / 10000^(2i/d)),   PE[p, 2i+1] = cos(p / 10000^(2i/d))

Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762, section 3.5.

For any offset k, PE(p + k) = M_k PE(p) with M_k block-diagonal 2×2 rotations by angles
k / 10000^(2i/d), independent of p. Computed on the fly in fp32 from int64 positions, so any
position works (no table, no max length). Exact formula; fp32 rounding of p·ω grows with p.

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
    exponent = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-exponent / d_model)  # (d/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., n, d/2)
    # interleave: even columns sin, odd columns cos
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., n, d)


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
