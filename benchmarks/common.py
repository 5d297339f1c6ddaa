"""What every benchmark contender looks like.

A contender is a factory ``(seq_len, device=CPU) -> step``: it builds its module and inputs for
that length (batch 1, d_model 512, 8 heads, head dim 64, fp32 unless stated) on ``device``, as
a user would (the module built, then ``.to(device)``; inputs made there), and returns
``step``, a zero-argument function that runs the forward pass and returns the output tensor.
The harness in ``benchmarks/attention.py`` times ``step().sum().backward()`` (the forward
under autocast for ``--dtype bf16`` / ``fp16``, ``benchmarks/device.py``) and measures peak
memory.
Each kernel's contenders live in ``benchmarks/contenders_<kernel>.py`` as a function
``contenders() -> dict[str, ContenderFactory]``; peers whose package is missing are left out.

Optional error hook: a contenders module may also define
``errors(n, device=CPU, dtype=torch.float32) -> dict[str, float]``, the approximation error of
each of its contenders against exact softmax attention at length n (use ``relative_error``
below, on inputs from ``error_inputs``, so numbers are comparable across modules; the kernels
get the inputs in ``dtype``, the exact reference is fp64 on the fp32 inputs). The harness
prints it as a separate table; exact contenders may omit it.

Optional availability hook: ``unavailable(device) -> dict[str, str]``, contenders that cannot
run on ``device`` (a GPU-only peer on the CPU, a peer not installed) and why; the harness
leaves them out and prints the reasons under its tables.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Step = Callable[[], Tensor]
ContenderFactory = Callable[..., Step]  # (n: int, device: torch.device = CPU) -> Step
ErrorHook = Callable[..., dict[str, float]]  # (n, device=CPU, dtype=torch.float32) -> errors

BATCH, D_MODEL, HEADS, HEAD_DIM = 1, 512, 8, 64
CPU = torch.device("cpu")


def error_inputs(n: int, *, seed: int = 0, device: torch.device = CPU
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed q, k, v ``(BATCH, HEADS, n, HEAD_DIM)`` fp32 (standard normal) for error hooks:
    drawn on the CPU (the same numbers on every device), then moved to ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (BATCH, HEADS, n, HEAD_DIM)
    return tuple(torch.randn(shape, generator=g, device="cpu").to(device)
                 for _ in range(3))  # type: ignore[return-value]


def randn(*shape: int, device: torch.device = CPU, requires_grad: bool = False) -> Tensor:
    """Standard normal fp32 inputs made on ``device`` (from torch's global RNG there)."""
    return torch.randn(*shape, device=device, requires_grad=requires_grad)


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F, computed in fp64."""
    approx, exact = approx.detach().double(), exact.detach().double()
    return float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))
