"""The ListOps job's optimisation settings and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "onecycle-linear")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW; ``schedule`` "cosine" (default): linear warm-up then
    cosine decay to 0; "onecycle-linear": ``torch.optim.lr_scheduler.OneCycleLR`` with
    ``anneal_strategy="linear"`` and its defaults (lr from lr/25 up to lr over ``warmup``
    steps, then down to lr/2.5e5; β₁ cycled 0.95 → 0.85 → 0.95), as the Nyströmformer code.
    ``clip_norm`` None: no gradient clipping. ``eval_every``, ``time_budget_s``, ``dtype``:
    see the module docstring."""

    steps: int = 1400
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    eval_batch_size: int = 256
    threads: int = 1
    device: str = "cpu"
    seed: int = 0
    schedule: str = "cosine"
    adam_eps: float = 1e-8
    clip_norm: float | None = 1.0
    eval_every: int | None = None
    time_budget_s: float | None = None
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.dtype not in AMP_DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(AMP_DTYPES)}, got {self.dtype!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every: expected a positive int or None, got "
                             f"{self.eval_every}")
        if self.schedule == "onecycle-linear" and not 2 <= self.warmup < self.steps:
            # OneCycleLR's warm-up phase ends at step warmup − 1: it must be past step 0
            raise ValueError(f"onecycle-linear: expected 2 <= warmup < steps, got warmup "
                             f"{self.warmup}, steps {self.steps}")


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig
                  ) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule ``cfg.schedule`` over ``cfg.steps`` steps."""
    if cfg.schedule == "onecycle-linear":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.warmup / cfg.steps,
            anneal_strategy="linear",
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))


def evaluations(cfg: TrainConfig, steps: int | None = None) -> list[int]:
    """The steps after which the validation split is scored (``eval_every``; always after
    the last step), for a run of ``steps`` steps (default ``cfg.steps``)."""
    steps = cfg.steps if steps is None else steps
    if cfg.eval_every is None:
        return [steps]
    marks = list(range(cfg.eval_every, steps + 1, cfg.eval_every))
    return marks if marks and marks[-1] == steps else [*marks, steps]


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
