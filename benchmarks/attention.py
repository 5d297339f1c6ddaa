"""Attention benchmark: forward+backward time and peak memory vs sequence length.

    python -m benchmarks.attention                       # 512..8192, every contender
    python -m benchmarks.attention --lengths 512 1024 --repeats 2 --contenders SoftmaxAttention

Contenders come from ``benchmarks/contenders_softmax.py`` and, when present,
``benchmarks/contenders_performer.py`` and ``benchmarks/contenders_nystrom.py`` (the contract
is in ``benchmarks/common.py``).

Time: for each length, every contender is built and warmed up once in this process, then
rounds time one ``step().sum().backward()`` of each contender in turn (round robin, so a
burst of load on a shared machine hits all of them alike): at least ``--repeats`` rounds, and
more while a contender has spent under ``--min-seconds`` timing (short lengths get many
cheap rounds). Tables, plot and target use the median round; the JSON also has the best.
The progress bar counts every memory run and timed step: the guaranteed rounds from the start,
each extra round from the moment it is decided (before the previous round's last step is
counted), so it reads 100 % only when the last step is done.
(On a shared machine one lucky round can make the minimum 40% off; the median of
interleaved rounds kept the ratio steadier in our runs.)

Peak memory: every (contender, length) runs ONE step in a fresh subprocess; peak = VmHWM
after the step − VmRSS before it, with the peak counter reset, and glibc told to unmap freed
blocks (``benchmarks/memory.py`` documents and justifies the method).

Error hook: a contenders module may define ``errors(n) -> dict[str, float]`` (relative error
against exact softmax attention); the harness prints those in a separate table.
Results: ``benchmarks/runs/attention.json`` (untracked), or ``--out``, with the ``.md`` table
and the ``.png`` plot (time and memory vs length) beside it; ``--update-results`` refreshes the
committed ``benchmarks/results/attention.*`` instead.
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

from benchmarks.attention_report import (
    Results,
    check_target,
    error_lines,
    markdown_report,
    markdown_tables,
    median_time,
    plot,
)
from benchmarks.common import (
    BATCH,
    D_MODEL,
    HEAD_DIM,
    HEADS,
    ContenderFactory,
    ErrorHook,
    Step,
)
from benchmarks.memory import fwd_bwd, measure_memory
from benchmarks.outputs import add_output_options, output_path

#: The contender modules, by explicit name; the last two are optional.
MODULES = (
    "benchmarks.contenders_softmax",
    "benchmarks.contenders_performer",
    "benchmarks.contenders_nystrom",
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


def all_contenders(modules: list[ModuleType]) -> dict[str, tuple[str, ContenderFactory]]:
    """name -> (module name, factory), in module order."""
    table: dict[str, tuple[str, ContenderFactory]] = {}
    for module in modules:
        for name, factory in module.contenders().items():
            if name in table:
                raise ValueError(f"contender {name!r} defined by {table[name][0]} and "
                                 f"{module.__name__}")
            table[name] = (module.__name__, factory)
    return table


def time_round_robin(factories: dict[str, ContenderFactory], n: int, repeats: int,
                     tick: Callable[[], None], min_seconds: float = 0.0,
                     grow: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Build and warm up every contender at length n, then time rounds.

    At least ``repeats`` rounds, more (up to 20 · repeats) while the contender that has spent
    the least time in timed steps has spent less than ``min_seconds``: short lengths get many
    cheap rounds.

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
            steps[name] = factory(n)
            start = time.perf_counter()
            fwd_bwd(steps[name])  # warm-up
            out[name] = {"warmup_s": time.perf_counter() - start}
        except Exception as error:  # a contender failing must not stop the others
            steps.pop(name, None)
            out[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
            for _ in range(repeats):
                tick()
    times: dict[str, list[float]] = {name: [] for name in steps}
    rounds = 0
    more = bool(steps) and repeats > 0
    while more:
        last = len(steps) - 1
        for i, (name, step) in enumerate(steps.items()):
            start = time.perf_counter()
            fwd_bwd(step)
            times[name].append(time.perf_counter() - start)
            if i == last:  # the round is done: decide on the next one before the bar moves
                rounds += 1
                more = rounds < repeats or (
                    rounds < 20 * repeats and min(sum(ts) for ts in times.values()) < min_seconds
                )
                if more and rounds >= repeats and grow is not None:
                    grow(len(steps))  # an extra round: its steps join the bar's total first
            tick()
    for name, ts in times.items():
        out[name]["times_s"] = ts
    return out


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per length (minimum)")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="keep adding rounds (up to 20x repeats) until every contender has "
                        "spent this long in timed steps at a length")
    p.add_argument("--contenders", nargs="+", metavar="NAME",
                   help="only these contenders (default: all found)")
    add_output_options(p, OUTPUT)  # the JSON; the .md and .png go beside it
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for one memory subprocess; a contender that fails or times "
                        "out there is not timed at that length")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--max-step-seconds", type=float, default=5.0,
                   help="a contender whose one step took longer is skipped at longer lengths")
    p.add_argument("--error-lengths", type=int, nargs="*", default=[1024],
                   help="lengths for the optional error hooks (give none to skip)")
    return p.parse_args(argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)  # before any work: a refused --out fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    modules = load_modules()
    table = all_contenders(modules)
    names = list(table)
    if args.contenders:
        unknown = sorted(set(args.contenders) - set(table))
        if unknown:
            raise SystemExit(f"unknown contenders {unknown}; available: {names}")
        names = [nm for nm in names if nm in args.contenders]
    lengths = sorted(args.lengths)
    threads = torch.get_num_threads()
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
                    mem = measure_memory(table[nm][0], nm, n, threads=args.threads,
                                         timeout=args.timeout)
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
                                          args.min_seconds, grow).items():
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
    tables = markdown_tables(results, lengths)
    print("\n" + "\n".join(tables))
    verdict = check_target(results, lengths)
    if verdict:
        print(verdict + "\n")

    errors: dict[int, dict[str, float]] = {}
    hooks: list[ErrorHook] = [m.errors for m in modules if hasattr(m, "errors")]
    for n in args.error_lengths if hooks else []:
        errors[n] = {k: v for hook in hooks for k, v in hook(n).items()}
    error_table = error_lines(errors)
    print("\n".join(error_table))

    report = {
        "config": {
            "batch": BATCH, "d_model": D_MODEL, "heads": HEADS, "head_dim": HEAD_DIM,
            "dtype": "float32", "device": "cpu", "min_rounds": args.repeats,
            "min_seconds": args.min_seconds, "max_step_seconds": args.max_step_seconds,
            "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(), "load_average_1min": load,
            "time_statistic": "median over interleaved rounds (best also in the JSON)",
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
        "errors": {str(n): per for n, per in errors.items()},
        "total_seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_report(report, tables, error_table))
    plot(results, out.with_suffix(".png"), threads)
    print(f"wrote {out} and the .md and .png beside it ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
