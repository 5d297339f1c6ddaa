"""Train and evaluate one ListOps variant for a fixed step budget.

Each run can go in a fresh process (``processes.run_in_processes``) so its peak memory is its
own: on CPU the peak resident set growth over the run (``ru_maxrss`` after training minus
before), on CUDA ``torch.cuda.max_memory_allocated``.

Evaluation: by default the final model, on the validation and test splits. With
``eval_every`` (the LRA preset: every 50 steps, as the Nyströmformer code), the model is
scored on the validation split every ``eval_every`` steps and after the last step, the state
with the best validation accuracy (the first, on ties) is kept, and the test split is scored
with THAT state, not the last one (the last one reads ~17.5 % on LRA ListOps: LRA issues #15,
#60). ``time_budget_s`` stops training early, once the training loop (its validations
included) has run that long; the schedule is not stretched, and a stopped run says so
(``stopped_early``). ``dtype`` bf16 / fp16 runs forward passes under autocast (fp16
with a gradient scaler).
"""

from __future__ import annotations

import contextlib
import copy
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import AMP_DTYPES, TrainConfig, evaluations, make_schedule
from .data import PAD_ID, Split
from .model import ListOpsClassifier, ModelConfig
from .progress import Progress
from .variants import Variant, rdrop_loss, rdrop_parts


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
    """The units of work ``train_variant`` reports: training steps and the evaluation
    batches (every validation, then the test)."""
    valid = eval_batches(splits["valid"], cfg.eval_batch_size)
    return cfg.steps + len(evaluations(cfg)) * valid + eval_batches(splits["test"],
                                                                     cfg.eval_batch_size)


@torch.no_grad()
def accuracy(
    model: ListOpsClassifier,
    split: Split,
    *,
    batch_size: int,
    device: str,
    tick: Callable[[], None] | None = None,
    dtype: str = "fp32",
) -> float:
    """Accuracy over ``split`` (forward under autocast for ``dtype`` bf16 / fp16); ``tick()``
    after each batch. Leaves the model in eval mode."""
    model.eval()
    order = torch.argsort(split.lengths)  # similar lengths together: less padding
    correct = 0
    for start in range(0, len(split), batch_size):
        tokens, mask, labels = _batch(split, order[start : start + batch_size], device)
        with _autocast(device, dtype):
            logits = model(tokens, mask)
        correct += int((logits.argmax(-1) == labels).sum())
        if tick is not None:
            tick()
    return correct / len(split)


def _autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    if AMP_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[dtype])


def _options(variant: Variant) -> dict[str, Any]:
    """The attention factory's keyword options, JSON-ready (objects by their repr)."""
    options = dict(getattr(variant.attention, "keywords", {}) or {})
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
            for k, v in options.items()}


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
    (``run_units``: the training steps and the evaluation batches). This function draws
    nothing itself: the caller owns the bars (``progress.RunBars``).
    """
    report: Progress = progress or (lambda done, note: None)
    torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    device = train_cfg.device
    model = ListOpsClassifier(variant.attention, model_cfg).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
        eps=train_cfg.adam_eps,
    )
    schedule = make_schedule(optimizer, train_cfg)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=train_cfg.dtype == "fp16")
    loss_rdrop = rdrop_loss(variant.rdrop_alpha)
    train = splits["train"]
    gen = torch.Generator().manual_seed(train_cfg.seed)
    cuda = device.startswith("cuda")
    _warm_up(model, train, device)  # page in the kernels' code so RSS growth is the run's data
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_mb()
    valid_batches = eval_batches(splits["valid"], train_cfg.eval_batch_size)
    marks = set(evaluations(train_cfg))
    done = 0  # units of work reported (run_units)

    def tick() -> None:
        nonlocal done
        done += 1
        report(done, "")

    evaluate = partial(accuracy, model, batch_size=train_cfg.eval_batch_size, device=device,
                       dtype=train_cfg.dtype)
    curve: list[tuple[int, float]] = []  # (step, validation accuracy)
    best: tuple[float, int, dict[str, Tensor]] | None = None  # (accuracy, step, state)
    eval_seconds = 0.0

    def validate(step: int) -> None:
        nonlocal best, eval_seconds
        begin = time.perf_counter()
        acc = evaluate(splits["valid"], tick=tick)
        eval_seconds += time.perf_counter() - begin
        curve.append((step, acc))
        if best is None or acc > best[0]:  # strictly better: the first best is kept
            best = (acc, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        model.train()

    model.train()
    losses: list[float] = []  # the training objective, per step
    task_losses: list[float] = []  # cross-entropy (R-Drop: the mean of the two passes')
    kl_terms: list[float] = []  # R-Drop's symmetric KL, unweighted (R-Drop runs only)
    report(0, "training")
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = bucketed_batches(train.lengths, train_cfg.batch_size, gen)
    stopped_early = False
    steps_done = 0
    for step in range(1, train_cfg.steps + 1):
        index = next(batches)
        tokens, mask, labels = _batch(train, index, device)
        with _autocast(device, train_cfg.dtype):
            if variant.rdrop_alpha > 0:  # both dropout passes in one forward: duplicate
                logits = model(tokens.repeat(2, 1), mask.repeat(2, 1))
                first, second = logits.float().chunk(2)
                loss = loss_rdrop(first, second, labels)
            else:
                loss = F.cross_entropy(model(tokens, mask).float(), labels)
        if variant.rdrop_alpha > 0:
            task, kl = rdrop_parts(first.detach(), second.detach(), labels)
            task_losses.append(task)
            kl_terms.append(kl)
        else:
            task_losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if train_cfg.clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        losses.append(float(loss.detach()))
        steps_done = step
        done += 1
        if step % 20 == 0:
            recent = task_losses[-20:]
            report(done, f"task loss={sum(recent) / len(recent):.3f}")
        else:
            report(done, "")
        budget = train_cfg.time_budget_s
        stopped_early = (budget is not None and step < train_cfg.steps
                         and time.perf_counter() - start >= budget)  # validations included
        if step in marks or stopped_early:
            if train_cfg.eval_every is not None:
                validate(step)
            if stopped_early:
                break
    if cuda:
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start - eval_seconds  # training steps only
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

    if stopped_early:  # the validations and steps that will not run count as done
        done = train_cfg.steps + (len(evaluations(train_cfg)) * valid_batches
                                  if train_cfg.eval_every is not None else 0)
    report(done, "evaluating")
    if train_cfg.eval_every is None:  # the final model on both splits
        valid_accuracy = evaluate(splits["valid"], tick=tick)
        best_step = steps_done
    else:  # the best validation state on the test split (validate ran after the last step)
        valid_accuracy, best_step, state = best  # type: ignore[misc]
        model.load_state_dict(state)
    test_accuracy = evaluate(splits["test"], tick=tick)
    report(done, f"test acc {test_accuracy:.3f}")
    return {
        "variant": variant.name,
        "attention": getattr(variant.attention, "func", variant.attention).__name__,
        "attention_options": _options(variant),
        "rdrop_alpha": variant.rdrop_alpha,
        "rdrop_loss": "transformer_zoo.RDropLoss" if variant.rdrop_alpha > 0 else None,
        "steps": steps_done,
        "stopped_early": stopped_early,
        "train_seconds": train_seconds,
        "steps_per_second": steps_done / train_seconds,
        "train_cpu_seconds": cpu_seconds,
        # means over the last 10 % of the steps; task loss comparable across every run
        "final_task_loss": tail_mean(task_losses),
        "final_rdrop_kl": tail_mean(kl_terms) if kl_terms else None,
        "final_objective": tail_mean(losses),
        "valid_accuracy": valid_accuracy,
        "test_accuracy": test_accuracy,
        "evaluated": "final model" if train_cfg.eval_every is None
        else "best validation checkpoint",
        "best_step": best_step,
        "validation_curve": curve,
        "peak_memory_mb": peak_mb,
        "memory_kind": memory_kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {"model": asdict(model_cfg), "train": asdict(train_cfg)},
    }
