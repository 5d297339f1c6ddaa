"""Learned absolute positional embedding (acts on the input).

    x_p ← x_p + P[p],   P ∈ R^(max_len × d) learned

Gehring et al. 2017 (arXiv 1705.03122); BERT (Devlin et al. 2019, arXiv 1810.04805).
Exact lookup; positions must lie in [0, max_len).

Shapes: positions ``(n,)`` or ``(b, n)`` int64 -> ``(n, d)`` or ``(b, n, d)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int, check_tensor
from transformer_zoo.positional.base import InputEncoding


class LearnedPositionalEncoding(InputEncoding):
    """A learned table of ``max_len`` position vectors.

    Args:
        max_len: number of positions; positions outside [0, max_len) raise ValueError.
        d_model: model width.
        init_std: std of the normal initialisation (BERT uses 0.02).
    """

    def __init__(self, max_len: int, d_model: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.max_len = check_positive_int(max_len, "max_len")
        self.d_model = check_positive_int(d_model, "d_model")
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, positions: Tensor) -> Tensor:
        check_tensor(positions, "positions")
        if positions.dtype != torch.int64:
            raise TypeError(f"positions: expected int64, got dtype {positions.dtype}")
        if (
            not torch.compiler.is_compiling()
            and positions.numel()
            and (int(positions.min()) < 0 or int(positions.max()) >= self.max_len)
        ):
            raise ValueError(
                f"positions: expected values in [0, max_len) = [0, {self.max_len}), got range "
                f"[{int(positions.min())}, {int(positions.max())}]"
            )
        return self.weight[positions]  # (..., n, d)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"
