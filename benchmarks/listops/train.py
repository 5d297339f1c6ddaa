"""Train and evaluate one ListOps variant for a fixed step budget.

Each run can go in a fresh process (``run_in_processes``) so its peak memory is its own: on CPU
the peak resident set growth over the run (``ru_maxrss`` after training minus before), on
CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import resource
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import PAD_ID, Split
from .model import ListOpsClassifier, ModelConfig
from .variants import Variant, rdrop_loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW, linear warm-up then cosine decay to 0."""

    steps: int = 1400
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    eval_batch_size: int = 256
    threads: int = 1
    device: str = "cpu"
    seed: int = 0


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def bucketed_batches(
    lengths: Tensor, batch_size: int, generator: torch.Generator, *, pool: int = 50
) -> Iterator[Tensor]:
    """Endless batches of indices; each epoch covers every example once.

    Per epoch: shuffle, cut into pools of ``pool`` batches, sort each pool by length, cut it
    into batches and shuffle the batches. Batches then hold similar lengths (little padding)
    while their order and make-up stay random.
    """
    n = int(lengths.shape[0])
    while True:
        order = torch.randperm(n, generator=generator)
        batches = []
        for start in range(0, n, pool * batch_size):
            chunk = order[start : start + pool * batch_size]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            batches += [b for b in chunk.split(batch_size) if len(b) == batch_size]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


def _batch(split: Split, index: Tensor, device: str) -> tuple[Tensor, Tensor, Tensor]:
    width = int(split.lengths[index].max())
    tokens = split.tokens[index, :width].to(device)  # (b, n) trimmed to the longest
    return tokens, tokens != PAD_ID, split.labels[index].to(device)


@torch.no_grad()
def accuracy(model: ListOpsClassifier, split: Split, *, batch_size: int, device: str) -> float:
    model.eval()
    order = torch.argsort(split.lengths)  # similar lengths together: less padding
    correct = 0
    for start in range(0, len(split), batch_size):
        tokens, mask, labels = _batch(split, order[start : start + batch_size], device)
        correct += int((model(tokens, mask).argmax(-1) == labels).sum())
    return correct / len(split)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _warm_up(model: ListOpsClassifier, split: Split, device: str) -> None:
    """One tiny forward + backward on a copy, leaving the model and every RNG untouched."""
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        tokens, mask, labels = _batch(split, torch.arange(2), device)
        tokens, mask = tokens[:, :8], mask[:, :8]
        F.cross_entropy(copy.deepcopy(model)(tokens, mask), labels).backward()


def train_variant(
    variant: Variant,
    splits: dict[str, Split],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    progress: bool = True,
    position: int = 0,
) -> dict[str, Any]:
    """Train ``variant`` for ``train_cfg.steps`` steps; return its metrics as a dict."""
    from tqdm.auto import tqdm

    torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    device = train_cfg.device
    model = ListOpsClassifier(variant.attention, model_cfg).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, train_cfg))
    loss_rdrop = rdrop_loss(variant.rdrop_alpha)
    train = splits["train"]
    gen = torch.Generator().manual_seed(train_cfg.seed)
    cuda = device.startswith("cuda")
    _warm_up(model, train, device)  # page in the kernels' code so RSS growth is the run's data
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_mb()

    model.train()
    losses: list[float] = []
    bar = tqdm(range(train_cfg.steps), desc=variant.name, disable=not progress, position=position)
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = bucketed_batches(train.lengths, train_cfg.batch_size, gen)
    for _ in bar:
        index = next(batches)
        tokens, mask, labels = _batch(train, index, device)
        if variant.rdrop_alpha > 0:  # both dropout passes in one forward: duplicate the batch
            logits = model(tokens.repeat(2, 1), mask.repeat(2, 1))
            first, second = logits.chunk(2)
            loss = loss_rdrop(first, second, labels)
        else:
            loss = F.cross_entropy(model(tokens, mask), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    if cuda:
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads: robust to a busy machine
    bar.close()

    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory_kind = "cuda max_memory_allocated"
    else:
        peak_mb = _peak_rss_mb() - rss_before
        memory_kind = "cpu peak RSS growth"
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "variant": variant.name,
        "attention": getattr(variant.attention, "func", variant.attention).__name__,
        "attention_options": dict(getattr(variant.attention, "keywords", {}) or {}),
        "rdrop_alpha": variant.rdrop_alpha,
        "rdrop_loss": "transformer_zoo.RDropLoss" if variant.rdrop_alpha > 0 else None,
        "steps": train_cfg.steps,
        "train_seconds": train_seconds,
        "steps_per_second": train_cfg.steps / train_seconds,
        "train_cpu_seconds": cpu_seconds,
        "final_train_loss": sum(tail) / len(tail),
        "valid_accuracy": accuracy(
            model, splits["valid"], batch_size=train_cfg.eval_batch_size, device=device
        ),
        "test_accuracy": accuracy(
            model, splits["test"], batch_size=train_cfg.eval_batch_size, device=device
        ),
        "peak_memory_mb": peak_mb,
        "memory_kind": memory_kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {"model": asdict(model_cfg), "train": asdict(train_cfg)},
    }


def run_in_processes(
    fn: Callable[..., Any], calls: list[tuple[tuple[Any, ...], dict[str, Any]]], *, jobs: int
) -> list[Any]:
    """``[fn(*args, **kwargs) for args, kwargs in calls]``, ``jobs`` calls at a time, each in a
    fresh spawned process so that its peak memory is its own; results in ``calls`` order."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(fn, *args, **kwargs) for args, kwargs in calls]
        return [f.result() for f in futures]
