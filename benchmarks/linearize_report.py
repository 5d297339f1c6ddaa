"""Table and plot of ``benchmarks.linearize_minilm`` (from its JSON; no computing here), and
the ``--merge`` helpers that fold one re-run variant into the committed JSON."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def markdown(results: dict) -> str:
    """The table docs/linearize.md includes: quality zero-shot and after transfer, cost."""
    budget = results["budget_seconds"]
    load = results["load_average"]
    lines = [
        "<!-- Written by `python -m benchmarks.linearize_minilm`; do not edit by hand. -->",
        f"{results['model']}; train: {results['train']['source']} ({results['train']['texts']} "
        f"texts, {results['train']['tokens'][0]}-{results['train']['tokens'][1]} tokens, batch "
        f"{results['batch']}); held-out: {results['held_out']['source']} "
        f"({results['held_out']['short']} passages + {results['held_out']['long']} long ones, "
        f"{results['held_out']['tokens'][0]}-{results['held_out']['tokens'][1]} tokens). "
        f"Budget: stage 1 {budget['stage1']:g} s, stage 2 {budget['stage2']:g} s of training; "
        f"CPU, {results['threads']} thread{'s' * (results['threads'] != 1)} of "
        f"{results['cpus']} cores, load average "
        f"{load['start'][0]:.1f} at the start and {load['end'][0]:.1f} at the end (a shared "
        f"machine); torch {results['torch']}." + _recipe(results.get("recipe")),
        "",
        "| variant | zero-shot cosine | Spearman | after: cosine (min) | Spearman | stage 1 "
        "steps / s | stage 2 steps / s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["results"]:
        z, a, r = row["zero_shot"], row["after"], row["report"]
        s1, s2 = r["stage1"], r["stage2"]
        first = "skipped" if s1["skipped"] else f"{s1['steps']} / {s1['seconds']:.0f}"
        second = "skipped" if s2["skipped"] else f"{s2['steps']} / {s2['seconds']:.0f}"
        lines.append(f"| {row['variant']} | {z['cosine']:.4f} | {z['spearman']:.4f} | "
                     f"{a['cosine']:.4f} ({a['cosine_min']:.4f}) | {a['spearman']:.4f} | "
                     f"{first} | {second} |")
    lines += ["", "Variants:"] + [f"- `{row['variant']}`: {row['note']}"
                                  for row in results["results"]]
    merged = [row for row in results["results"] if row.get("run")]
    if merged:
        lines += ["", "Rows run separately (`--merge`; the run details above are the others'):"]
        lines += [f"- `{row['variant']}`: {_run(row['run'], results.get('recipe'))}"
                  for row in merged]
    for key in ("scaling", "scaling_hybrid"):
        if results.get(key):
            lines += _scaling(results[key], key)
    return "\n".join(lines) + "\n"


def _scaling(scaling: dict, key: str) -> list[str]:
    """The linear-cost section of one converted attention (snippet ``key`` for the docs)."""
    when = (f" Measured {scaling['date']}, {scaling['threads']} thread"
            f"{'s' * (scaling['threads'] != 1)}, load average {scaling['load_average'][0]:.1f}."
            if scaling.get("date") else "")
    lines = [
        "",
        f"<!-- --8<-- [start:{key}] -->",
        f"Converted attention alone (`{scaling['attention'].splitlines()[0]}`...): forward "
        "time per token (median of 3) and forward+backward peak memory per token (fresh "
        "process), batch 1." + (f" Kept from {scaling['kept_from']}."
                                if scaling.get("kept_from") else "") + when,
        "",
        "| n | forward µs / token | peak KiB / token |",
        "|---:|---:|---:|",
    ]
    for row in scaling["rows"]:
        mem = "—" if row["bytes_per_token"] is None else f"{row['bytes_per_token'] / 1024:.1f}"
        lines.append(f"| {row['n']} | {row['us_per_token']:.2f} | {mem} |")
    memory = scaling["memory_ratio"]
    lines += ["", f"Max / min per token over n: time {scaling['time_ratio']:.2f}x, memory "
              + ("—" if memory is None else f"{memory:.2f}x") + " (target: within 1.5x).",
              f"<!-- --8<-- [end:{key}] -->"]
    return lines


def _run(run: dict, recipe: dict | None) -> str:
    load, budget = run["load_average"], run["budget_seconds"]
    changed = {k: v for k, v in run["recipe"].items() if (recipe or {}).get(k, v) != v}
    return (f"{run['date']}, {run['threads']} thread{'s' * (run['threads'] != 1)}, load "
            f"average {load['start'][0]:.1f} at the start and {load['end'][0]:.1f} at the end; "
            f"budget: stage 1 {budget['stage1']:g} s, stage 2 {budget['stage2']:g} s; "
            + ("the same recipe" if not changed else "recipe changes: " + ", ".join(
                f"{k} {v}" for k, v in changed.items()))
            + (f"; window {run['recipe']['window']}" if "window" in run["recipe"] else "")
            + ".")


def _recipe(r: dict | None) -> str:
    if not r:
        return ""
    return (f" Recipe: stage 1 on the texts cut to {r['stage1_tokens']} tokens, AdamW lr "
            f"{r['stage1_lr']:g}; stage 2 on the full texts"
            + (f" of {r['stage2_min_tokens']}+ tokens" if r["stage2_min_tokens"] else "")
            + f", weights `{r['stage2_trainable']}`, lr {r['stage2_lr']:g}"
            + (f", + {r['pooled_cosine']:g} x (1 - pooled cosine)" if r["pooled_cosine"] else "")
            + f"; {r['schedule']} schedule in both.")


def plot(results: dict, path: Path) -> bool:
    """Held-out cosine (first 2 batches of passages) against training steps; False without
    matplotlib (the JSON and table are still written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in results["results"]:
        curve = row["report"]["curve"]
        offset, xs, ys = 0, [], []
        last_stage1 = max([c["step"] for c in curve if c["stage"] == 1], default=0)
        for c in curve:
            offset = last_stage1 if c["stage"] == 2 else 0
            xs.append(c["step"] + offset)
            ys.append(c["value"])
        ax.plot(xs, ys, marker=".", label=row["variant"])
    ax.set_xlabel("training steps (stage 1, then stage 2)")
    ax.set_ylabel("held-out cosine to the original")
    ax.set_title("all-MiniLM-L6-v2 linearized")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- --merge: one variant re-run, the others kept -----------------------------------------------
#: run-level fields that must agree between a file and the rows merged into it (same data)
SAME_DATA = ("model", "batch", "train", "held_out")


def merge_base(earlier: dict, now: dict) -> dict:
    """The earlier results, to merge this run's rows into; SystemExit if they were measured on
    other data (model, batch, texts), where the rows would not be comparable."""
    differ = [k for k in SAME_DATA if earlier.get(k) != now.get(k)]
    if differ:
        raise SystemExit(f"--merge: the existing file was measured with other {differ}; run "
                         "without --merge (or with the same options)")
    return earlier


def run_details(args: argparse.Namespace, s1: float, s2: float, load_start) -> dict:
    """What a merged row's run was (the file's run-level fields describe the others)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "budget_seconds": {"stage1": s1, "stage2": s2},
            "recipe": {"stage1_lr": args.stage1_lr, "stage2_lr": args.stage2_lr,
                       "schedule": args.schedule, "stage2_trainable": args.stage2_trainable,
                       "pooled_cosine": args.pooled_cosine, "hedgehog_dim": args.hedgehog_dim,
                       "stage1_tokens": args.stage1_tokens,
                       "stage2_min_tokens": args.stage2_min_tokens, "window": args.window}}
