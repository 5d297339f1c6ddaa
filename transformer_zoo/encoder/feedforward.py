"""Position-wise feed-forward blocks.

GELU:   FFN(x) = W_2 GELU(W_1 x + b_1) + b_2        (Hendrycks & Gimpel 2016, arXiv 1606.08415)
SwiGLU: FFN(x) = W_2 (SiLU(W_1 x) ⊙ W_3 x)           (Shazeer 2020, arXiv 2002.05202)

Shapes: ``(b, n, d_model) -> (b, n, d_model)``, hidden width d_ff. Exact.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int, check_probability


class FeedForward(nn.Module):
    """GELU feed-forward: Linear(d_model, d_ff) -> GELU -> dropout -> Linear(d_ff, d_model)."""

    def __init__(self, d_model: int, d_ff: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        self.fc1 = nn.Linear(d_model, check_positive_int(d_ff, "d_ff"))
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(check_probability(dropout, "dropout"))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class SwiGLUFeedForward(nn.Module):
    """SwiGLU feed-forward (no biases, as in PaLM/Llama): W_2 (SiLU(W_1 x) ⊙ W_3 x)."""

    def __init__(self, d_model: int, d_ff: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(d_ff, "d_ff")
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(check_probability(dropout, "dropout"))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.silu(self.gate(x)) * self.up(x)))
