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
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import PAD_ID, Split
from .model import ListOpsClassifier, ModelConfig
from .progress import Progress
from .variants import Variant, rdrop_loss, rdrop_parts


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


def eval_batches(split: Split, batch_size: int) -> int:
    """How many batches ``accuracy`` runs over ``split``."""
    return -(-len(split) // batch_size)


def run_units(splits: dict[str, Split], cfg: TrainConfig) -> int:
    """The units of work ``train_variant`` reports: training steps, then evaluation batches."""
    return cfg.steps + sum(eval_batches(splits[s], cfg.eval_batch_size) for s in ("valid", "test"))


@torch.no_grad()
def accuracy(
    model: ListOpsClassifier,
    split: Split,
    *,
    batch_size: int,
    device: str,
    tick: Callable[[], None] | None = None,
) -> float:
    """Accuracy over ``split``; ``tick()`` after each batch."""
    model.eval()
    order = torch.argsort(split.lengths)  # similar lengths together: less padding
    correct = 0
    for start in range(0, len(split), batch_size):
        tokens, mask, labels = _batch(split, order[start : start + batch_size], device)
        correct += int((model(tokens, mask).argmax(-1) == labels).sum())
        if tick is not None:
            tick()
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
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train ``variant`` for ``train_cfg.steps`` steps; return its metrics as a dict.

    ``progress(done, note)``, when given, hears of every finished unit of work
    (``run_units``: the training steps, then the evaluation batches). This function draws
    nothing itself: the caller owns the bars (``progress.RunBars``).
    """
    report: Progress = progress or (lambda done, note: None)
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
    losses: list[float] = []  # the training objective, per step
    task_losses: list[float] = []  # cross-entropy (R-Drop: the mean of the two passes')
    kl_terms: list[float] = []  # R-Drop's symmetric KL, unweighted (R-Drop runs only)
    report(0, "training")
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = bucketed_batches(train.lengths, train_cfg.batch_size, gen)
    for step in range(1, train_cfg.steps + 1):
        index = next(batches)
        tokens, mask, labels = _batch(train, index, device)
        if variant.rdrop_alpha > 0:  # both dropout passes in one forward: duplicate the batch
            logits = model(tokens.repeat(2, 1), mask.repeat(2, 1))
            first, second = logits.chunk(2)
            loss = loss_rdrop(first, second, labels)
            task, kl = rdrop_parts(first.detach(), second.detach(), labels)
            task_losses.append(task)
            kl_terms.append(kl)
        else:
            loss = F.cross_entropy(model(tokens, mask), labels)
            task_losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            recent = task_losses[-20:]
            report(step, f"task loss={sum(recent) / len(recent):.3f}")
        else:
            report(step, "")
    if cuda:
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads: robust to a busy machine

    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory_kind = "cuda max_memory_allocated"
    else:
        peak_mb = _peak_rss_mb() - rss_before
        memory_kind = "cpu peak RSS growth"
    def tail_mean(values: list[float]) -> float:  # over the last 10 % of the steps
        tail = values[-max(1, len(values) // 10) :]
        return sum(tail) / len(tail)

    done = train_cfg.steps
    report(done, "evaluating")

    def tick() -> None:
        nonlocal done
        done += 1
        report(done, "")

    evaluate = partial(accuracy, model, batch_size=train_cfg.eval_batch_size, device=device,
                       tick=tick)
    valid_accuracy, test_accuracy = evaluate(splits["valid"]), evaluate(splits["test"])
    report(done, f"test acc {test_accuracy:.3f}")
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
        # means over the last 10 % of the steps; task loss comparable across every run
        "final_task_loss": tail_mean(task_losses),
        "final_rdrop_kl": tail_mean(kl_terms) if kl_terms else None,
        "final_objective": tail_mean(losses),
        "valid_accuracy": valid_accuracy,
        "test_accuracy": test_accuracy,
        "peak_memory_mb": peak_mb,
        "memory_kind": memory_kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {"model": asdict(model_cfg), "train": asdict(train_cfg)},
    }


_QUEUE: Any = None  # in a worker process: where its calls' progress reports go


def _set_queue(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _send(index: int, done: int, note: str) -> None:
    _QUEUE.put((index, done, note))


def _call_reporting(index: int, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    return fn(*args, progress=partial(_send, index), **kwargs)


def run_in_processes(
    fn: Callable[..., Any],
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    jobs: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Any]:
    """``[fn(*args, **kwargs) for args, kwargs in calls]``, ``jobs`` calls at a time, each in a
    fresh spawned process so that its peak memory is its own; results in ``calls`` order.

    With ``progress``, call ``i`` gets ``progress=`` a ``Progress`` whose reports travel by a
    queue to this process, where a thread hands them to ``progress(i, done, note)``; every
    report has been handed over when this returns. The workers draw nothing.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue() if progress is not None else None
    listener = None
    if progress is not None:

        def listen() -> None:
            for message in iter(queue.get, None):
                progress(*message)

        listener = threading.Thread(target=listen, name="listops-progress", daemon=True)
        listener.start()
    try:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, max_tasks_per_child=1,
            initializer=_set_queue, initargs=(queue,),
        ) as pool:
            futures = [
                pool.submit(fn, *args, **kwargs) if queue is None
                else pool.submit(_call_reporting, i, fn, args, kwargs)
                for i, (args, kwargs) in enumerate(calls)
            ]
            results = [f.result() for f in futures]
        # the pool has joined its workers, which flushed their queue on exit: None comes last
    finally:
        if listener is not None:
            queue.put(None)
            listener.join()
    return results
