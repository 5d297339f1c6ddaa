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
(On a shared machine one lucky round can make the minimum 40% off; the median of
interleaved rounds kept the ratio steadier in our runs.)

Peak memory: every (contender, length) runs ONE step in a fresh subprocess; peak = VmHWM
after the step − VmRSS before it, with the peak counter reset, and glibc told to unmap freed
blocks (``benchmarks/memory.py`` documents and justifies the method).

Error hook: a contenders module may define ``errors(n) -> dict[str, float]`` (relative error
against exact softmax attention); the harness prints those in a separate table.
Results go to ``--out`` (JSON) and the same path with ``.png`` (time and memory vs length).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

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

#: The contender modules, by explicit name; the last two are optional.
MODULES = (
    "benchmarks.contenders_softmax",
    "benchmarks.contenders_performer",
    "benchmarks.contenders_nystrom",
)
BASELINE = "nn.MultiheadAttention"
TARGET = ("SoftmaxAttention", 1.05)  # SoftmaxAttention <= 1.05x the baseline's time
DEFAULT_OUT = Path("benchmarks/results/attention.json")


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
                     tick: Callable[[], None], min_seconds: float = 0.0) -> dict[str, dict]:
    """Build and warm up every contender at length n, then time rounds.

    At least ``repeats`` rounds, more (up to 20 · repeats) while the slowest contender has
    spent less than ``min_seconds`` in timed steps: short lengths get many cheap rounds.
    """
    steps: dict[str, Step] = {}
    out: dict[str, dict] = {}
    for name, factory in factories.items():
        try:
            steps[name] = factory(n)
            fwd_bwd(steps[name])  # warm-up
        except Exception as error:  # a contender failing must not stop the others
            steps.pop(name, None)
            out[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
    times: dict[str, list[float]] = {name: [] for name in steps}
    rounds = 0
    while steps and (rounds < repeats or (
        rounds < 20 * repeats and min(sum(ts) for ts in times.values()) < min_seconds
    )):
        for name, step in steps.items():
            start = time.perf_counter()
            fwd_bwd(step)
            times[name].append(time.perf_counter() - start)
            if rounds < repeats:
                tick()  # the progress bar counts the guaranteed rounds
        rounds += 1
    for name, ts in times.items():
        out[name] = {"times_s": ts}
    return out


# -- reporting ---------------------------------------------------------------------------------

Results = dict[str, dict[int, dict]]  # contender -> length -> measurements


def median_time(r: dict) -> float | None:
    return statistics.median(r["times_s"]) if r.get("times_s") else None


def peak_memory(r: dict) -> float | None:
    return r.get("peak_bytes")


def print_tables(results: Results, lengths: list[int]) -> None:
    names = list(results)
    for title, key, fmt in (
        ("forward+backward time (median of rounds)", median_time, lambda v: f"{1e3 * v:.1f} ms"),
        ("peak memory of one forward+backward", peak_memory, lambda v: f"{v / 2**20:.0f} MiB"),
    ):
        if all(key(r) is None for per in results.values() for r in per.values()):
            continue  # e.g. --no-memory
        print(f"\n{title}; (x) = ratio to {BASELINE}")
        widths = [max(len(nm), 20) for nm in names]
        print("       n | " + " | ".join(nm.ljust(w) for nm, w in zip(names, widths, strict=True)))
        for n in lengths:
            base = key(results[BASELINE][n]) if BASELINE in results else None
            cells = []
            for nm, w in zip(names, widths, strict=True):
                value = key(results[nm][n])
                cell = "failed" if value is None else fmt(value)
                if value is not None and base:
                    cell += f" ({value / base:.2f}x)"
                cells.append(cell.ljust(w))
            print(f"{n:>8} | " + " | ".join(cells))
    failures = [(nm, n, r[k]) for nm, per in results.items() for n, r in per.items()
                for k in ("time_error", "memory_error") if k in r]
    for nm, n, why in failures:
        print(f"  {nm} at n={n} failed: {why}")


def check_target(results: Results, lengths: list[int]) -> str | None:
    ours, limit = TARGET
    if ours not in results or BASELINE not in results:
        return None
    ratios = []
    for n in lengths:
        a, b = median_time(results[ours][n]), median_time(results[BASELINE][n])
        if a is None or b is None:
            return f"target: {ours} or {BASELINE} failed at n={n}"
        ratios.append(a / b)
    worst = max(ratios)
    verdict = "met" if worst <= limit else "MISSED"
    listed = ", ".join(f"{n}: {r:.2f}x" for n, r in zip(lengths, ratios, strict=True))
    return f"target {ours} <= {limit}x {BASELINE} time at every length: {verdict} ({listed})"


def plot(results: Results, path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(median_time, 1e3, "forward+backward time (ms)"),
              (peak_memory, 2.0**-20, "peak memory (MiB)")]
    panels = [p for p in panels if any(p[0](r) for per in results.values() for r in per.values())]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, scale, label) in zip(axes[0], panels, strict=True):
        for name, per_n in results.items():
            pts = [(n, key(r)) for n, r in sorted(per_n.items()) if key(r)]
            ax.plot([n for n, _ in pts], [v * scale for _, v in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"batch {BATCH}, d_model {D_MODEL}, {HEADS} heads × {HEAD_DIM}, fp32, "
                 f"CPU, {threads} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; PNG beside it")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for one memory subprocess; a contender that fails or times "
                        "out there is not timed at that length")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--error-lengths", type=int, nargs="*", default=[1024],
                   help="lengths for the optional error hooks (give none to skip)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

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
    per_length = len(names) * (args.repeats + (0 if args.no_memory else 1))
    with tqdm(total=per_length * len(lengths), desc="attention benchmark", unit="run") as bar:
        for n in lengths:
            timed = {}
            for nm in names:
                bar.set_postfix_str(f"n={n} memory {nm}")
                if not args.no_memory:
                    mem = measure_memory(table[nm][0], nm, n, threads=args.threads,
                                         timeout=args.timeout)
                    if "error" in mem:
                        results[nm][n]["memory_error"] = mem.pop("error")
                    results[nm][n].update(mem)
                    bar.update()
                if "memory_error" not in results[nm][n]:
                    timed[nm] = table[nm][1]
            bar.set_postfix_str(f"n={n} timing")
            for nm, r in time_round_robin(timed, n, args.repeats, bar.update,
                                             args.min_seconds).items():
                if "error" in r:
                    r["time_error"] = r.pop("error")
                results[nm][n].update(r)
    print_tables(results, lengths)
    verdict = check_target(results, lengths)
    if verdict:
        print("\n" + verdict)

    errors: dict[int, dict[str, float]] = {}
    hooks: list[ErrorHook] = [m.errors for m in modules if hasattr(m, "errors")]
    if hooks and args.error_lengths:
        for n in args.error_lengths:
            errors[n] = {k: v for hook in hooks for k, v in hook(n).items()}
        print("\nrelative error vs exact softmax attention, ‖approx − exact‖_F / ‖exact‖_F")
        for n, per in errors.items():
            for name, value in per.items():
                print(f"  n={n:<6} {name:<40} {value:.3e}")

    report = {
        "config": {
            "batch": BATCH, "d_model": D_MODEL, "heads": HEADS, "head_dim": HEAD_DIM,
            "dtype": "float32", "device": "cpu", "min_rounds": args.repeats,
            "min_seconds": args.min_seconds, "threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "time_statistic": "median over rounds (best also given)",
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
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"), threads)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
