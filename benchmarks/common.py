"""What every benchmark contender looks like.

A contender is a factory ``seq_len -> step``: it builds its module and inputs for that length
(batch 1, d_model 512, 8 heads, head dim 64, fp32 unless stated) and returns ``step``, a
zero-argument function that runs the forward pass and returns the output tensor. The harness
in ``benchmarks/attention.py`` times ``step().sum().backward()`` and measures peak memory.
Each kernel's contenders live in ``benchmarks/contenders_<kernel>.py`` as a function
``contenders() -> dict[str, ContenderFactory]``; peers whose package is missing are left out.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Step = Callable[[], Tensor]
ContenderFactory = Callable[[int], Step]

BATCH, D_MODEL, HEADS, HEAD_DIM = 1, 512, 8, 64
