"""Render ``benchmarks/attention.py`` results: Markdown tables (printed and written) and a PNG.

Tables have one row per contender and one column per length; each cell is the value and its
ratio to the baseline (``nn.MultiheadAttention``) at that length.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import BATCH, D_MODEL, HEAD_DIM, HEADS

Results = dict[str, dict[int, dict]]  # contender -> length -> measurements

BASELINE = "nn.MultiheadAttention"
TARGET = ("SoftmaxAttention", 1.05)  # SoftmaxAttention <= 1.05x the baseline's time


def median_time(r: dict) -> float | None:
    return statistics.median(r["times_s"]) if r.get("times_s") else None


def peak_memory(r: dict) -> float | None:
    return r.get("peak_bytes")


def _why_missing(r: dict) -> str:
    if "skipped" in r:
        return "skipped"
    return "failed" if ("time_error" in r or "memory_error" in r) else "-"


def markdown_tables(results: Results, lengths: list[int]) -> list[str]:
    """Time and memory tables in Markdown (a terminal shows them fine too)."""
    lines: list[str] = []
    for title, key, fmt in (
        ("forward+backward time, median of rounds", median_time, lambda v: f"{1e3 * v:.1f} ms"),
        ("peak memory of one forward+backward", peak_memory, lambda v: f"{v / 2**20:.0f} MiB"),
    ):
        if all(key(r) is None for per in results.values() for r in per.values()):
            continue  # e.g. --no-memory
        lines += [f"**{title}** (x: ratio to {BASELINE})", "",
                  "| contender | " + " | ".join(f"n = {n}" for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for name, per in results.items():
            cells = []
            for n in lengths:
                value = key(per[n])
                base = key(results[BASELINE][n]) if BASELINE in results else None
                cell = _why_missing(per[n]) if value is None else fmt(value)
                if value is not None and base:
                    cell += f" ({value / base:.2f}x)"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, per in results.items():
        for n, r in per.items():
            for k in ("skipped", "time_error", "memory_error"):
                if k in r:
                    lines.append(f"- {name} at n = {n}: {k.replace('_', ' ')}: {r[k]}")
    return lines


def check_target(results: Results, lengths: list[int]) -> str | None:
    ours, limit = TARGET
    if ours not in results or BASELINE not in results:
        return None
    ratios = []
    for n in lengths:
        a, b = median_time(results[ours][n]), median_time(results[BASELINE][n])
        if a is None or b is None:
            return f"target: {ours} or {BASELINE} has no time at n={n}"
        ratios.append(a / b)
    worst = max(ratios)
    verdict = "met" if worst <= limit else "MISSED"
    listed = ", ".join(f"{n}: {r:.2f}x" for n, r in zip(lengths, ratios, strict=True))
    return f"target {ours} <= {limit}x {BASELINE} time at every length: {verdict} ({listed})"


def error_lines(errors: dict[int, dict[str, float]]) -> list[str]:
    if not errors:
        return []
    lines = ["**relative error vs exact softmax attention**, ‖approx − exact‖_F / ‖exact‖_F",
             "", "| n | contender | error |", "|---:|---|---:|"]
    for n, per in errors.items():
        lines += [f"| {n} | {name} | {value:.3e} |" for name, value in per.items()]
    return [*lines, ""]


def markdown_report(report: dict, tables: list[str], errors: list[str]) -> str:
    """The whole ``attention.md``: settings and machine, tables, target, errors."""
    c = report["config"]
    load = c.get("load_average_1min")
    load_text = "load not recorded" if load is None else f"load average {load:.1f} at the start"
    head = (
        f"<!-- Written by `python -m benchmarks.attention`; do not edit by hand. -->\n"
        f"Batch {c['batch']}, d_model {c['d_model']}, {c['heads']} heads × {c['head_dim']}, "
        f"fp32, CPU. Machine: {c['cpu_model']} ({c['cpu_count']} cores), {c['threads']} "
        f"thread(s), torch {c['torch']}, {load_text}; {report['total_seconds']:.0f} s in all. "
        f"Time: {c['time_statistic']}, at least {c['min_rounds']} rounds. "
        f"Memory: {c['memory_method']}."
    )
    target = [report["target"], ""] if report.get("target") else []
    return "\n".join([head, "", *tables, *target, *errors])


def plot(results: Results, path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(median_time, 1e3, "forward+backward time (ms)"),
              (peak_memory, 2.0**-20, "peak memory (MiB)")]
    panels = [p for p in panels if any(p[0](r) for per in results.values() for r in per.values())]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (key, scale, label) in zip(axes[0], panels, strict=True):
        for name, per_n in results.items():
            pts = [(n, key(r)) for n, r in sorted(per_n.items()) if key(r)]
            ax.plot([n for n, _ in pts], [v * scale for _, v in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"batch {BATCH}, d_model {D_MODEL}, {HEADS} heads × {HEAD_DIM}, fp32, "
                 f"CPU, {threads} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
