"""``python -m benchmarks.listops``: train every attention variant on generated ListOps.

Default: CPU-sized data and budget (about 5 minutes on 2 cores). ``--smoke``: a few seconds
per run, for tests. ``--full``: LRA's data sizes and step budget (a GPU job).
Writes ``listops.json``, ``listops.png`` and ``listops.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .data import LRA_CONFIG, ListOpsConfig, Split, majority_baseline, make_splits
from .model import ModelConfig
from .report import markdown_report, markdown_table, write_json, write_png
from .train import TrainConfig, run_isolated, train_variant
from .variants import build_variants

RESULTS = Path(__file__).resolve().parents[1] / "results"

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
    mode.add_argument("--full", action="store_true", help="LRA-scale data and budget")
    p.add_argument("--steps", type=int, help="training steps per variant (preset default)")
    p.add_argument("--batch-size", type=int, help="training batch size (preset default)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--rdrop-alpha", type=float, default=1.0, help="R-Drop weight α")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results; smoke: results/tmp)"
    )
    p.add_argument(
        "--no-isolate", action="store_true", help="run variants in this process (memory column "
        "then measures the process, not the run)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
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
    out = args.out or (RESULTS / "tmp" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    begin = time.perf_counter()
    splits = make_splits(data_cfg, seed=args.seed)
    data = _data_summary(data_cfg, splits)
    print(
        f"ListOps {mode}: {len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])} "
        f"expressions, mean test length {data['mean_length']['test']:.0f} tokens, "
        f"generated in {time.perf_counter() - begin:.1f} s"
    )
    model_cfg = ModelConfig()
    runs = []
    for variant in build_variants(full=args.full, rdrop_alpha=args.rdrop_alpha):
        call = (variant, splits, model_cfg, train_cfg)
        kwargs = {"progress": not args.quiet}
        if args.no_isolate:
            runs.append(train_variant(*call, **kwargs))
        else:
            runs.append(run_isolated(train_variant, *call, **kwargs))
    result = {
        "benchmark": "listops",
        "mode": mode,
        "seed": args.seed,
        "machine": _machine(args.device, args.threads),
        "data": data,
        "model": model_cfg.__dict__,
        "train": train_cfg.__dict__,
        "runs": runs,
        "total_seconds": time.perf_counter() - begin,
    }
    table = markdown_table(result)
    print(table)
    write_json(result, out / "listops.json")
    write_png(result, out / "listops.png")
    (out / "listops.md").write_text(markdown_report(result))
    print(f"{result['total_seconds']:.0f} s in all; wrote listops.json/.png/.md to {out}")
    return result


if __name__ == "__main__":
    main()
