"""``python -m benchmarks.listops``: train every attention variant on generated ListOps.

Default: CPU-sized data and budget (about 5 minutes on 2 cores). ``--smoke``: a few seconds
per run, for tests. ``--full``: the Nyströmformer paper's LRA ListOps setup (``presets.py``; a
GPU job: ``--device cuda``), its table with the paper's test accuracies beside ours.
``--steps``, ``--examples``, ``--lengths``, ``--eval-every`` and ``--time-budget`` override a
preset (a stopped or shrunk run says so in its JSON). ``--prepare-data`` generates (and
caches) the data and stops: LRA's 100k expressions take minutes even on many cores.
Writes ``listops.json``, ``listops.png`` and ``listops.md`` into ``benchmarks/runs/listops/``
(untracked; ``--smoke``: ``benchmarks/runs/listops-smoke/``), or ``--out``;
``--update-results`` refreshes the committed ones in ``benchmarks/results/`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..device import DTYPES, device_info, parse_device
from ..outputs import RESULTS, add_output_options, output_path
from .config import TrainConfig
from .data import ListOpsConfig, Split, majority_baseline
from .presets import CACHE, PRESETS, load_or_make_splits
from .processes import run_in_processes
from .progress import RunBars
from .report import loss_note, markdown_table, write_all
from .train import run_units, train_variant
from .variants import Variant, build_variants

COMMITTED_JSON = RESULTS / "listops.json"
__all__ = ["CACHE", "load_or_make_splits", "main", "output_folder", "parse_args"]


def _machine(device: str, threads: int, dtype: str = "fp32") -> dict[str, Any]:
    info = device_info(torch.device(device), dtype)
    cpu = info["cpu_model"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = f"{cores} CPU cores ({cpu})"
    if device.startswith("cuda"):
        description = f"{info['device_name']}, " + description
    return {
        "description": description,
        "cpu": cpu,
        "cores": cores,
        "threads": threads,
        "device": device,
        "device_name": info["device_name"],
        "dtype": info["dtype"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        # other load on the machine when the run started (a shared machine inflates wall time)
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _data_summary(config: ListOpsConfig, splits: dict[str, Split]) -> dict[str, Any]:
    label, acc = majority_baseline(splits["train"], splits["test"])
    return {
        "config": config.to_dict(),
        "mean_length": {k: float(s.lengths.float().mean()) for k, s in splits.items()},
        "max_length_seen": {k: int(s.lengths.max()) for k, s in splits.items()},
        "test_label_counts": torch.bincount(splits["test"].labels, minlength=10).tolist(),
        "majority_baseline": {"label": label, "test_accuracy": acc},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.listops", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny data and budget (tests)")
    mode.add_argument("--full", action="store_true",
                      help="the Nyströmformer paper's LRA ListOps setup (a GPU job)")
    p.add_argument("--steps", type=int, help="training steps per variant (preset default)")
    p.add_argument("--batch-size", type=int, help="training batch size (preset default)")
    p.add_argument("--examples", type=int, nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                   help="split sizes (preset default)")
    p.add_argument("--lengths", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="expression lengths in tokens (preset default)")
    p.add_argument("--eval-every", type=int,
                   help="validate every N steps and test the best checkpoint (--full: 50)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop each variant's training loop (validations included) after this "
                   "long")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="only these variants (default: all; --full: those without R-Drop)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="autocast dtype of the forward passes (fp16 with a gradient scaler)")
    p.add_argument("--data-workers", type=int,
                   help="processes drawing --full's data (default: one per core)")
    p.add_argument("--prepare-data", action="store_true",
                   help="generate (and cache) the data, then stop")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--rdrop-alpha", type=float, default=1.0, help="R-Drop weight α")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at a time, each in its own process (CPU only)"
    )
    p.add_argument("--device", type=parse_device, default=torch.device("cpu"),
                   help="cpu (default), cuda, cuda:1, ...")
    add_output_options(p, "listops/ (--smoke: listops-smoke/)", committed="")
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="run variants one by one in this process (the memory column then measures the "
        "process, not the run)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="regenerate the data instead of reusing benchmarks/runs/cache/listops-data-*.pt",
    )
    p.add_argument("--cache-dir", type=Path, default=CACHE,
                   help="where generated data is cached (default benchmarks/runs/cache)")
    p.add_argument(
        "--report-only",
        type=Path,
        nargs="?",
        const=COMMITTED_JSON,
        metavar="JSON",
        help="train nothing: rewrite the table and plot from a results JSON (default: the "
        "committed benchmarks/results/listops.json), into the output folder",
    )
    args = p.parse_args(argv)
    if args.update_results and args.smoke:
        p.error("--update-results: --smoke runs are not committed results")
    for name in ("steps", "batch_size", "threads", "jobs", "eval_every", "data_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.time_budget is not None and args.time_budget <= 0:
        p.error(f"--time-budget: expected seconds > 0, got {args.time_budget}")
    args.device = str(args.device)
    return args


def _warmup(train_cfg: TrainConfig, steps: int) -> int:
    """The preset's warm-up; for the one-cycle schedule with other ``steps``, the same
    fraction of them (it needs 2 <= warm-up < steps, so at least 3 steps)."""
    if train_cfg.schedule != "onecycle-linear" or steps == train_cfg.steps:
        return train_cfg.warmup
    return min(steps - 1, max(2, round(steps * train_cfg.warmup / train_cfg.steps)))


def select_variants(args: argparse.Namespace) -> list[Variant]:
    """The variants to run: ``--variants`` by name, else all (``--full``: without R-Drop,
    the paper's rows)."""
    variants = build_variants(full=args.full, rdrop_alpha=args.rdrop_alpha)
    if args.variants is None:
        return [v for v in variants if v.rdrop_alpha == 0] if args.full else variants
    known = [v.name for v in variants]
    unknown = [name for name in args.variants if name not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; available: {known}")
    return [v for v in variants if v.name in args.variants]


def overrides(args: argparse.Namespace, data_cfg: ListOpsConfig) -> ListOpsConfig:
    """The preset's data with ``--examples`` / ``--lengths`` applied."""
    if args.examples:
        data_cfg = replace(data_cfg, n_train=args.examples[0], n_valid=args.examples[1],
                           n_test=args.examples[2])
    if args.lengths:
        data_cfg = replace(data_cfg, min_length=args.lengths[0], max_length=args.lengths[1])
    return data_cfg


def output_folder(args: argparse.Namespace) -> Path:
    """``benchmarks/runs/listops[-smoke]/`` (untracked) unless ``--out``; the committed
    ``benchmarks/results/`` only with ``--update-results``."""
    return output_path(args, "listops-smoke" if args.smoke else "listops", committed="")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = output_folder(args)
    if args.report_only is not None:
        result = json.loads(args.report_only.read_text())
        out.mkdir(parents=True, exist_ok=True)
        print(markdown_table(result) + "\n\n" + loss_note(result))
        write_all(result, out)
        return result
    mode = "smoke" if args.smoke else "full" if args.full else "default"
    preset = PRESETS[mode]
    data_cfg, model_cfg = overrides(args, preset.data), preset.model
    train_cfg = preset.train
    steps = args.steps or train_cfg.steps
    train_cfg = replace(
        train_cfg,
        steps=steps,
        warmup=_warmup(train_cfg, steps),
        batch_size=args.batch_size or train_cfg.batch_size,
        eval_every=args.eval_every or train_cfg.eval_every,
        time_budget_s=args.time_budget,
        dtype=args.dtype,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
    )
    variants = select_variants(args)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    machine = _machine(args.device, args.threads, args.dtype)
    begin = time.perf_counter()
    cache = None if (args.no_cache or args.smoke) else args.cache_dir
    splits = load_or_make_splits(data_cfg, args.seed, cache, shards=preset.shards,
                                 workers=args.data_workers)
    data = _data_summary(data_cfg, splits)
    if args.prepare_data:
        print(f"ListOps {mode} data ready in {time.perf_counter() - begin:.0f} s "
              f"({len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])})")
        return {"mode": mode, "data": data}
    print(
        f"ListOps {mode}: {len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])} "
        f"expressions, mean test length {data['mean_length']['test']:.0f} tokens, "
        f"ready in {time.perf_counter() - begin:.1f} s",
        flush=True,  # before the bars, which go to stderr
    )
    call_args = [(v, splits, model_cfg, train_cfg) for v in variants]
    units = run_units(splits, train_cfg)
    # one bar per run, all drawn here (workers only report), all closed before the table
    with RunBars([v.name for v in variants], [units] * len(variants),
                 enabled=not args.quiet) as bars:
        if args.no_isolate:
            runs = [train_variant(*a, progress=bars.reporter(i)) for i, a in enumerate(call_args)]
        else:
            jobs = 1 if args.device.startswith("cuda") else max(1, args.jobs)
            # R-Drop runs cost about twice as much: start them first so the workers finish
            # together
            order = sorted(range(len(variants)), key=lambda i: -variants[i].rdrop_alpha)
            done = run_in_processes(
                train_variant, [(call_args[i], {}) for i in order], jobs=jobs,
                progress=None if args.quiet else lambda j, n, note: bars.update(order[j], n, note),
            )
            runs = [run for _, run in sorted(zip(order, done, strict=True))]
    result = {
        "benchmark": "listops",
        "mode": mode,
        "seed": args.seed,
        "preset_overridden": [k for k in ("steps", "examples", "lengths", "eval_every",
                                          "time_budget", "batch_size") if getattr(args, k)],
        "machine": machine,
        "data": data,
        "model": model_cfg.__dict__,
        "train": train_cfg.__dict__,
        "runs": runs,
        "jobs": 1 if args.no_isolate else args.jobs,
        "total_seconds": time.perf_counter() - begin,
    }
    print(markdown_table(result) + "\n\n" + loss_note(result))
    write_all(result, out)
    print(f"{result['total_seconds']:.0f} s in all; wrote listops.json/.png/.md to {out}")
    return result


if __name__ == "__main__":
    main()
