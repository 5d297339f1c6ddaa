"""Attention benchmark: forward+backward time and peak memory vs sequence length.

    python -m benchmarks.attention                       # 512..8192, every contender
    python -m benchmarks.attention --lengths 512 1024 --repeats 2 --contenders SoftmaxAttention
    python -m benchmarks.attention --device cuda --dtype bf16 --lengths 1024 32768

Contenders come from ``benchmarks/contenders_softmax.py`` and, when present,
``benchmarks/contenders_performer.py``, ``benchmarks/contenders_nystrom.py`` and
``benchmarks/contenders_fla.py`` (the contract is in ``benchmarks/common.py``).

Device and dtype (``benchmarks/device.py``): ``--device cuda`` builds every contender on the
GPU and times it with CUDA events after a synchronize; ``--dtype bf16`` / ``fp16`` runs the
forward passes under autocast. Contenders that cannot run on the device (a Triton peer on the
CPU) are listed with the reason instead.

Time: for each length, every contender is built and warmed up once in this process, then
rounds time one ``step().sum().backward()`` of each contender in turn (round robin: a burst of
load hits all alike; the median round kept ratios steadier than the best on a shared
machine): at least ``--repeats`` rounds, more while a contender has spent under
``--min-seconds`` timing. Tables, plot and target use the median; the JSON also has the best.
The progress bar counts every memory run and timed step (an extra round joins its total
before the previous round's last step is counted, so 100 % means done).

Peak memory (``measure_peak``): ONE step per (contender, length)
in a fresh subprocess, VmHWM after − VmRSS before (``benchmarks/memory.py`` justifies the
method); on CUDA ``torch.cuda.max_memory_allocated`` during ONE step in this process.

Error hook: a contenders module may define ``errors(n) -> dict[str, float]`` (relative error
against exact softmax attention); the harness prints those in a separate table.
Results: ``benchmarks/runs/attention.json`` (untracked), or ``--out``, with the ``.md`` table
and the ``.png`` plot (time and memory vs length) beside it; ``--update-results`` refreshes the
committed ``benchmarks/results/attention.*`` instead. While it runs, ``attention.partial.json``
holds the lengths done so far (a run stopped by a time cap keeps them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from collections.abc import Callable
from types import ModuleType

import torch

from benchmarks.attention_options import (
    all_contenders,
    parse_args,
    unavailable,
    write_partial,
)
from benchmarks.attention_report import (
    Results,
    check_target,
    error_lines,
    markdown_report,
    markdown_tables,
    median_time,
    more_targets,
    plot,
)
from benchmarks.common import (
    BATCH,
    CPU,
    D_MODEL,
    HEAD_DIM,
    HEADS,
    ContenderFactory,
    ErrorHook,
    Step,
)
from benchmarks.device import (
    DTYPES,
    device_info,
    is_out_of_memory,
    timer,
    under_autocast,
)
from benchmarks.memory import cuda_peak_of_one_step, fwd_bwd, measure_memory
from benchmarks.outputs import output_path

#: The contender modules, by explicit name; all but the first are optional.
MODULES = (
    "benchmarks.contenders_softmax",
    "benchmarks.contenders_encodings",
    "benchmarks.contenders_performer",
    "benchmarks.contenders_nystrom",
    "benchmarks.contenders_fla",
)
OUTPUT = "attention.json"


def load_modules() -> list[ModuleType]:
    """Import the contender modules that exist; a missing optional module is skipped."""
    found = []
    for name in MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            if error.name != name:  # the module exists but something it imports is broken
                raise
    return found


def _seconds(fn: Callable[[], None], clock: Callable[[Callable[[], None]], float] | None
             ) -> float:
    """``clock(fn)`` (CUDA events), or the wall clock of ``fn()`` when ``clock`` is None."""
    if clock is not None:
        return clock(fn)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_round_robin(factories: dict[str, ContenderFactory], n: int, repeats: int,
                     tick: Callable[[], None], min_seconds: float = 0.0,
                     grow: Callable[[int], None] | None = None, *,
                     device: torch.device = CPU, dtype: str = "fp32",
                     clock: Callable[[Callable[[], None]], float] | None = None
                     ) -> dict[str, dict]:
    """Build (on ``device``) and warm up every contender at length n, then time rounds.

    At least ``repeats`` rounds, more (up to 20 · repeats) while the contender that has spent
    the least time in timed steps has spent less than ``min_seconds``: short lengths get many
    cheap rounds. Forward passes run under autocast for ``dtype`` bf16 / fp16; ``clock(fn)``
    times one step (``device.timer``: CUDA events), the wall clock when None. A contender
    whose timed step raises (CUDA out of memory) is dropped from the later rounds, its error
    kept; its remaining steps still tick.

    Progress: ``tick()`` once per timed step, and ``repeats`` times for a contender that failed
    to build (its guaranteed steps are skipped). The caller's bar counts ``repeats`` steps per
    contender; before an extra round, ``grow(k)`` adds its ``k`` steps to the bar's total, and
    it is called before the previous round's last step is ticked, so the bar never reads
    100 % while a round is still to run.
    """
    steps: dict[str, Step] = {}
    out: dict[str, dict] = {}
    for name, factory in factories.items():
        try:
            steps[name] = under_autocast(factory(n, device=device), device, dtype)
            out[name] = {"warmup_s": _seconds(lambda s=steps[name]: fwd_bwd(s), clock)}
        except Exception as error:  # a contender failing must not stop the others
            steps.pop(name, None)
            out[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
            _release(device)
            for _ in range(repeats):
                tick()
    times: dict[str, list[float]] = {name: [] for name in steps}
    failed: set[str] = set()
    rounds = 0
    more = bool(steps) and repeats > 0
    while more:
        last = len(steps) - 1
        for i, (name, step) in enumerate(steps.items()):
            if name not in failed:
                try:
                    times[name].append(_seconds(lambda s=step: fwd_bwd(s), clock))
                except Exception as error:  # e.g. out of memory beside the other contenders
                    failed.add(name)
                    out[name]["error"] = f"{type(error).__name__}: {error}"[:200]
                    _release(device)
            if i == last:  # the round is done: decide on the next one before the bar moves
                rounds += 1
                alive = [ts for nm, ts in times.items() if nm not in failed]
                more = rounds < repeats or (
                    rounds < 20 * repeats and bool(alive)
                    and min(sum(ts) for ts in alive) < min_seconds
                )
                if more and rounds >= repeats and grow is not None:
                    grow(len(steps))  # an extra round: its steps join the bar's total first
            tick()
    for name, ts in times.items():
        out[name]["times_s"] = ts
    return out


def _release(device: torch.device) -> None:
    """After a failure on CUDA (out of memory): hand cached blocks back for the next one."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_peak(module: str, name: str, factory: ContenderFactory, n: int,
                 args: argparse.Namespace) -> dict:
    """Peak memory of one step: a fresh subprocess on the CPU (RSS), in process on CUDA;
    a failure comes back as ``{"error": reason}``."""
    if args.device.type != "cuda":
        return measure_memory(module, name, n, threads=args.threads, timeout=args.timeout,
                              dtype=args.dtype)
    try:
        return cuda_peak_of_one_step(factory, n, args.device, args.dtype)
    except Exception as error:  # out of memory, or a contender that fails on the GPU
        kind = "out of memory" if is_out_of_memory(error) else type(error).__name__
        return {"error": f"{kind}: {error}"[:200]}
    finally:
        _release(args.device)


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__)
    out = output_path(args, OUTPUT)  # before any work: a refused --out fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    modules = load_modules()
    table = all_contenders(modules)
    cannot = unavailable(modules, args.device)
    for nm in cannot:
        table.pop(nm, None)
    names = list(table)
    if args.contenders:
        unknown = sorted(set(args.contenders) - set(table) - set(cannot))
        if unknown:
            raise SystemExit(f"unknown contenders {unknown}; available: {names}")
        names = [nm for nm in names if nm in args.contenders]
    lengths = sorted(args.lengths)
    threads = torch.get_num_threads()
    clock = timer(args.device) if args.device.type == "cuda" else None  # None: wall clock
    results: Results = {nm: {n: {} for n in lengths} for nm in names}
    too_slow: dict[str, str] = {}  # contender -> why it is skipped at longer lengths
    per_length = len(names) * (args.repeats + (0 if args.no_memory else 1))
    with tqdm(total=per_length * len(lengths), desc="attention benchmark", unit="step") as bar:

        def grow(steps: int) -> None:  # extra timing rounds (--min-seconds) join the total
            bar.total += steps
            bar.refresh()

        for n in lengths:
            timed = {}
            for nm in names:
                r = results[nm][n]
                if nm in too_slow:
                    r["skipped"] = too_slow[nm]
                    bar.update(per_length // len(names))
                    continue
                bar.set_postfix_str(f"n={n} memory {nm}")
                if not args.no_memory:
                    mem = measure_peak(table[nm][0], nm, table[nm][1], n, args)
                    if "error" in mem:
                        r["memory_error"] = mem.pop("error")
                    r.update(mem)
                    bar.update()
                if "memory_error" in r:
                    bar.update(args.repeats)
                else:
                    timed[nm] = table[nm][1]
            bar.set_postfix_str(f"n={n} timing")
            for nm, r in time_round_robin(timed, n, args.repeats, bar.update,
                                          args.min_seconds, grow, device=args.device,
                                          dtype=args.dtype, clock=clock).items():
                if "error" in r:
                    r["time_error"] = r.pop("error")
                results[nm][n].update(r)
            for nm in names:
                r = results[nm][n]
                step_s = max(r.get("first_step_s", 0.0), r.get("warmup_s", 0.0))
                if nm not in too_slow and ("memory_error" in r or step_s > args.max_step_seconds):
                    too_slow[nm] = (
                        f"one step took {step_s:.1f} s at n = {n} (> --max-step-seconds "
                        f"{args.max_step_seconds:g})" if step_s > args.max_step_seconds
                        else f"failed at n = {n}"
                    )
            write_partial(out, args, results, n)
    tables = markdown_tables(results, lengths)
    tables += [f"- {nm}: not run: {why}" for nm, why in cannot.items()
               if not args.contenders or nm in args.contenders]
    print("\n" + "\n".join(tables))
    verdict = check_target(results, lengths)
    targets = [verdict] if verdict else []
    targets += more_targets(results, lengths)
    if targets:
        print("\n".join(targets) + "\n")

    errors: dict[int, dict[str, float]] = {}
    hooks: list[ErrorHook] = [m.errors for m in modules if hasattr(m, "errors")]
    for n in args.error_lengths if hooks else []:
        errors[n] = {k: v for hook in hooks
                     for k, v in hook(n, args.device, DTYPES[args.dtype]).items()}
    error_table = error_lines(errors)
    print("\n".join(error_table))

    report = {
        "config": {
            "batch": BATCH, "d_model": D_MODEL, "heads": HEADS, "head_dim": HEAD_DIM,
            **device_info(args.device, args.dtype), "min_rounds": args.repeats,
            "min_seconds": args.min_seconds, "max_step_seconds": args.max_step_seconds,
            "threads": threads, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "load_average_1min": load,
            "time_statistic": "median over interleaved rounds (best also in the JSON)",
            "clock": "CUDA events after torch.cuda.synchronize()" if clock else "wall clock",
            "memory_method": next((r["memory_method"] for per in results.values()
                                   for r in per.values() if "memory_method" in r), None),
        },
        "lengths": lengths,
        "results": {
            nm: {str(n): dict(r, median_s=median_time(r),
                              best_s=min(r["times_s"]) if r.get("times_s") else None)
                 for n, r in per.items()}
            for nm, per in results.items()
        },
        "target": verdict,
        "targets": targets,
        "unavailable": cannot,
        "errors": {str(n): per for n, per in errors.items()},
        "total_seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_report(report, tables, error_table))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    try:
        plot(results, out.with_suffix(".png"), report["config"])
    except ImportError as error:  # matplotlib is optional (e.g. on a bare GPU image)
        print(f"no plot: {error}")
    print(f"wrote {out} and the .md and .png beside it ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
