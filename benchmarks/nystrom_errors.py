"""Nyström error vs landmark count: ours, ours with an exact pinv, nystrom-attention.

    python -m benchmarks.nystrom_errors [--n 1024] [--out PATH.json | --update-results]
    python -m benchmarks.nystrom_errors --device cuda --dtype bf16

Relative error ‖Ŝ V − softmax(QKᵀ/√d) V‖_F / ‖softmax(QKᵀ/√d) V‖_F at d = 64, 8 heads, two
input families: "gaussian" (``common.error_inputs``: i.i.d. N(0, 1) q, k, v, no structure for
landmarks to exploit) and "smooth" (q, k are normalised random walks along the sequence, so
neighbouring tokens are alike and a segment mean represents its segment). Writes the JSON, a
Markdown table and a PNG next to it, into ``benchmarks/runs/`` (untracked) or ``--out``;
``--update-results`` refreshes the committed ``benchmarks/results/nystrom_errors.*`` instead.
``--report-only`` re-renders the table and PNG from the committed JSON (or the one given).
``--device`` / ``--dtype`` (``benchmarks/device.py``): where the kernels run and the dtype of
the q, k, v they get (the exact reference stays fp64 on the fp32 inputs); both are in the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import contenders_nystrom as cn
from benchmarks.common import CPU, HEAD_DIM, HEADS
from benchmarks.device import DTYPES, add_device_options, device_info
from benchmarks.outputs import RESULTS, add_output_options, output_path

OUTPUT = "nystrom_errors.json"
LANDMARKS = [4, 8, 16, 32, 64, 128, 256, 512]


def smooth_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    walk = torch.randn(3, 1, HEADS, n, HEAD_DIM, generator=g).cumsum(dim=-2)  # (3, b, h, n, d)
    walk = walk - walk.mean(dim=-2, keepdim=True)
    walk = walk / walk.std(dim=(-2, -1), keepdim=True)
    return walk[0], walk[1], torch.randn(1, HEADS, n, HEAD_DIM, generator=g)


def markdown(results: dict) -> str:
    """The table docs/nystrom.md includes: one row per (inputs, method), one column per m."""
    landmarks = results["landmarks"]
    lines = [
        "<!-- Written by `python -m benchmarks.nystrom_errors`; do not edit by hand. -->",
        f"Relative error vs exact softmax attention, n = {results['n']}, {HEADS} heads × "
        f"{HEAD_DIM}, {results['iterations']} pinv iterations unless stated.{_where(results)}",
        "",
        "| inputs | method | " + " | ".join(f"m = {m}" for m in landmarks) + " |",
        "|---|---|" + "---:|" * len(landmarks),
    ]
    for family in ("gaussian", "smooth"):
        for name, curve in results[family].items():
            lines.append(f"| {family} | {name} | " + " | ".join(f"{e:.3g}" for e in curve) + " |")
    return "\n".join(lines) + "\n"


def _where(results: dict) -> str:
    """The device and dtype, when a run was not on the CPU in fp32 (older JSON: neither)."""
    info = results.get("device")
    if info is None or (info["device"] == "cpu" and info["dtype"] == "float32"):
        return ""
    return f" Kernels on {info['dtype']} inputs, on {info['device_name']}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    add_output_options(parser, OUTPUT)  # the JSON; the .md and .png go beside it
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the Markdown table and PNG from a JSON "
                        "(default: the committed one) into the output location (no computing)")
    add_device_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report(json.loads(args.report_only.read_text()), out)
        return
    torch.set_num_threads(2)
    landmarks = [m for m in LANDMARKS if m <= args.n]
    where = dict(device=args.device, dtype=DTYPES[args.dtype])
    results = {"n": args.n, "landmarks": landmarks, "iterations": cn.ITERATIONS,
               "device": device_info(args.device, args.dtype),
               "gaussian": cn.landmark_sweep(args.n, landmarks, **where)}
    original = cn.error_inputs

    def smooth(n: int, seed: int = 0, device: torch.device = CPU) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in smooth_inputs(n, seed))

    cn.error_inputs = smooth  # the same sweep on smooth inputs
    try:
        results["smooth"] = cn.landmark_sweep(args.n, landmarks, **where)
    finally:
        cn.error_inputs = original
    out.write_text(json.dumps(results, indent=2))
    report(results, out)


def report(results: dict, out: Path) -> None:
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    landmarks = results["landmarks"]
    try:
        import matplotlib
    except ImportError as error:  # optional (e.g. on a bare GPU image): the table is written
        print(f"no plot: {error}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, family in zip(axes, ("gaussian", "smooth"), strict=True):
        for name, curve in results[family].items():
            ax.plot(landmarks, curve, marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="landmarks m", title=f"{family} inputs")
        ax.set_xticks(landmarks, [str(m) for m in landmarks])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"relative error vs exact softmax (n={results['n']})")
    axes[1].legend()
    fig.suptitle(f"Nyström attention error vs landmarks ({results['iterations']} pinv iterations)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
