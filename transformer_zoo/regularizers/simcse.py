"""Unsupervised SimCSE loss module (Gao et al. 2021, arXiv 2104.08821).

    ℓ_i = −log [ exp(cos(h_i, h_i⁺)/τ) / Σ_j exp(cos(h_i, h_j⁺)/τ) ]

h, h⁺: two dropout views of the same batch, e.g. from
:func:`transformer_zoo.regularizers.two_pass_forward` (one encoder call on the doubled batch,
as the SimCSE code does). Shapes: ``(b, d), (b, d) -> scalar``. Exact; the kernel is
:func:`transformer_zoo.functional.simcse_loss`.
"""

from __future__ import annotations

from torch import Tensor, nn

from transformer_zoo._scripting import refuse_scripting
from transformer_zoo.functional.simcse import simcse_loss


class SimCSELoss(nn.Module):
    """InfoNCE over in-batch pairs of two views, cosine similarity / ``temperature``.

    Args:
        temperature: τ > 0; the paper's 0.05.
        symmetric: also score view 2 against view 1 and average both directions.
    """

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    def __init__(self, *, temperature: float = 0.05, symmetric: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature: expected a float > 0, got {temperature}")
        self.temperature = float(temperature)
        self.symmetric = bool(symmetric)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return simcse_loss(z1, z2, temperature=self.temperature, symmetric=self.symmetric)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, symmetric={self.symmetric}"
