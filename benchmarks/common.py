"""What every benchmark contender looks like.

A contender is a factory ``seq_len -> step``: it builds its module and inputs for that length
(batch 1, d_model 512, 8 heads, head dim 64, fp32 unless stated) and returns ``step``, a
zero-argument function that runs the forward pass and returns the output tensor. The harness
in ``benchmarks/attention.py`` times ``step().sum().backward()`` and measures peak memory.
Each kernel's contenders live in ``benchmarks/contenders_<kernel>.py`` as a function
``contenders() -> dict[str, ContenderFactory]``; peers whose package is missing are left out.

Optional error hook: a contenders module may also define ``errors(n) -> dict[str, float]``,
the approximation error of each of its contenders against exact softmax attention at length
n (use ``relative_error`` below, on inputs from ``error_inputs``, so numbers are comparable
across modules). The harness prints it as a separate table; exact contenders may omit it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Step = Callable[[], Tensor]
ContenderFactory = Callable[[int], Step]
ErrorHook = Callable[[int], dict[str, float]]

BATCH, D_MODEL, HEADS, HEAD_DIM = 1, 512, 8, 64


def error_inputs(n: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed q, k, v ``(BATCH, HEADS, n, HEAD_DIM)`` fp32 (standard normal) for error hooks."""
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, n, HEAD_DIM)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))  # type: ignore[return-value]


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F, computed in fp64."""
    approx, exact = approx.detach().double(), exact.detach().double()
    return float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))
