"""``python -m benchmarks.listops``: train every attention variant on generated ListOps.

Default: CPU-sized data and budget (about 5 minutes on 2 cores). ``--smoke``: a few seconds
per run, for tests. ``--full``: LRA's data sizes and step budget (a GPU job).
Writes ``listops.json``, ``listops.png`` and ``listops.md`` into ``benchmarks/runs/listops/``
(untracked; ``--smoke``: ``benchmarks/runs/listops-smoke/``), or ``--out``;
``--update-results`` refreshes the committed ones in ``benchmarks/results/`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..outputs import RESULTS, RUNS, add_output_options, output_path
from .data import LRA_CONFIG, ListOpsConfig, Split, majority_baseline, make_splits
from .model import ModelConfig
from .progress import RunBars
from .report import loss_note, markdown_table, write_all
from .train import TrainConfig, run_in_processes, run_units, train_variant
from .variants import build_variants

CACHE = RUNS / "cache"  # generated splits, keyed by settings and seed
COMMITTED_JSON = RESULTS / "listops.json"

PRESETS: dict[str, tuple[ListOpsConfig, TrainConfig]] = {
    "smoke": (
        ListOpsConfig(
            min_length=8, max_length=64, max_depth=4, max_args=4, n_train=400, n_valid=100,
            n_test=200,
        ),
        TrainConfig(steps=12, batch_size=16, warmup=3),
    ),
    "default": (ListOpsConfig(), TrainConfig()),
    "full": (LRA_CONFIG, TrainConfig(steps=5000, batch_size=32, lr=1e-3, warmup=500)),
}


def _machine(device: str, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = f"{cores} CPU cores ({cpu})"
    if device.startswith("cuda"):
        description = f"{torch.cuda.get_device_name(device)}, " + description
    return {
        "description": description,
        "cpu": cpu,
        "cores": cores,
        "threads": threads,
        "device": device,
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


DATA_VERSION = 1  # bump when the generator changes, so cached splits are not reused


def load_or_make_splits(config: ListOpsConfig, seed: int, cache: Path | None) -> dict[str, Split]:
    """``make_splits(config, seed=seed)``, cached as a ``.pt`` file in ``cache`` when given."""
    if cache is None:
        return make_splits(config, seed=seed)
    key = json.dumps([DATA_VERSION, config.to_dict(), seed], sort_keys=True)
    path = cache / f"listops-data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        stored = torch.load(path, weights_only=True)
        return {name: Split(**tensors) for name, tensors in stored.items()}
    splits = make_splits(config, seed=seed)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({name: vars(split) for name, split in splits.items()}, path)
    return splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.listops", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny data and budget (tests)")
    mode.add_argument("--full", action="store_true", help="LRA-scale data and budget")
    p.add_argument("--steps", type=int, help="training steps per variant (preset default)")
    p.add_argument("--batch-size", type=int, help="training batch size (preset default)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--rdrop-alpha", type=float, default=1.0, help="R-Drop weight α")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at a time, each in its own process (CPU only)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
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
    for name in ("steps", "batch_size", "threads", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    return args


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
    data_cfg, train_cfg = PRESETS[mode]
    train_cfg = replace(
        train_cfg,
        steps=args.steps or train_cfg.steps,
        batch_size=args.batch_size or train_cfg.batch_size,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    machine = _machine(args.device, args.threads)
    begin = time.perf_counter()
    cache = None if (args.no_cache or args.smoke) else CACHE
    splits = load_or_make_splits(data_cfg, args.seed, cache)
    data = _data_summary(data_cfg, splits)
    print(
        f"ListOps {mode}: {len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])} "
        f"expressions, mean test length {data['mean_length']['test']:.0f} tokens, "
        f"ready in {time.perf_counter() - begin:.1f} s",
        flush=True,  # before the bars, which go to stderr
    )
    model_cfg = ModelConfig()
    variants = build_variants(full=args.full, rdrop_alpha=args.rdrop_alpha)
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
