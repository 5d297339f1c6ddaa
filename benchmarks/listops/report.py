"""Render ListOps results: a Markdown table (printed and written), JSON and a PNG.

A ``--full`` (LRA preset) table has the paper's test accuracy beside ours: the Nyströmformer
paper's re-run of LRA ListOps (Xiong et al. 2021, arXiv 2102.03902): softmax
37.10, Nyströmformer 37.15, Performer 18.80 (LRA's own, Tay et al. 2021: Transformer 36.37,
Performer 18.01), and the step of the checkpoint that was tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (
    ("variant", "variant", "{}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("valid_accuracy", "valid acc", "{:.3f}"),
    ("final_task_loss", "task loss (CE)", "{:.3f}"),
    ("final_rdrop_kl", "R-Drop KL", "{:.3f}"),
    ("steps_per_second", "steps/s", "{:.1f}"),
    ("train_cpu_seconds", "train CPU s", "{:.0f}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
)


#: Test accuracy (%) in the Nyströmformer paper's LRA ListOps run, by attention class.
PAPER_TEST_ACCURACY = {"SoftmaxAttention": 37.10, "NystromAttention": 37.15,
                       "PerformerAttention": 18.80}
PAPER = "Xiong et al. 2021 (arXiv 2102.03902), their LRA results"
FULL_COLUMNS = (("paper_test_accuracy", "paper test acc", "{:.4f}"),
                ("best_step", "tested step", "{}"))


def paper_accuracy(run: dict[str, Any]) -> float | None:
    """The paper's test accuracy (a fraction) for a run's attention; None with R-Drop (not in
    the paper) or for an attention it did not run."""
    if run.get("rdrop_alpha"):
        return None
    value = PAPER_TEST_ACCURACY.get(run.get("attention", ""))
    return None if value is None else value / 100


def columns(result: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """The table's columns: a ``full`` run adds the paper's accuracy and the tested step."""
    if result.get("mode") != "full":
        return COLUMNS
    return COLUMNS[:2] + FULL_COLUMNS + COLUMNS[2:]


def _cell(run: dict[str, Any], key: str, fmt: str) -> str:
    if key == "paper_test_accuracy":
        value = paper_accuracy(run)
        return "-" if value is None else fmt.format(value)
    value = run.get(key)
    if key == "final_task_loss" and value is None and not run["rdrop_alpha"]:
        value = run.get("final_train_loss")  # a JSON from before the split: the same number
    return "-" if value is None else fmt.format(value)


def markdown_table(result: dict[str, Any]) -> str:
    """The results table in Markdown, with the majority-class baseline as its last row."""
    cols = columns(result)
    lines = [
        "| " + " | ".join(title for _, title, _ in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for run in result["runs"]:
        cells = [_cell(run, key, fmt) for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    base = result["data"]["majority_baseline"]
    blanks = " |" * (len(cols) - 2)
    lines.append(f"| majority class ({base['label']}) | {base['test_accuracy']:.3f} |{blanks}")
    return "\n".join(lines)


def loss_note(result: dict[str, Any]) -> str:
    """What the two loss columns hold (printed and written under the table)."""
    alphas = sorted({run["rdrop_alpha"] for run in result["runs"] if run["rdrop_alpha"]})
    alpha = ", ".join(f"{a:g}" for a in alphas) or "-"
    note = (
        "Losses are training-batch means over the last 10 % of the steps. task loss (CE): "
        "cross-entropy; for +rdrop rows the mean of its two dropout passes' cross-entropies, "
        "so it compares with the rows without R-Drop. R-Drop KL: ½[KL(p₁‖p₂) + KL(p₂‖p₁)] "
        "between the two passes, unweighted; the R-Drop objective is CE₁ + CE₂ + α·KL "
        f"= 2 · task loss + α · KL, α = {alpha}."
    )
    if result.get("mode") == "full":
        note += (
            f" paper test acc: {PAPER} (their runs: fp16 mixed precision, dev scored on 62 "
            "batches of 32); tested step: the best validation checkpoint, which the test "
            "accuracy is of."
        )
    stopped = [run["variant"] for run in result["runs"] if run.get("stopped_early")]
    if stopped:
        note += (f" Stopped by the time budget before the full schedule: {', '.join(stopped)} "
                 "(steps/s and the step count say how far each got).")
    if any(run["rdrop_alpha"] and "final_task_loss" not in run for run in result["runs"]):
        note += (
            " A +rdrop row with - in both columns was run before the two were recorded apart: "
            "its JSON holds only the whole objective (`final_train_loss`)."
        )
    return note


def _settings(result: dict[str, Any]) -> str:
    """Precision, evaluation and preset overrides, where a run has them (older JSON: none)."""
    train, parts = result["train"], []
    if train.get("dtype", "fp32") != "fp32":
        parts.append(f"{train['dtype']} autocast")
    if train.get("eval_every"):
        parts.append(f"validation every {train['eval_every']} steps, the best checkpoint "
                     "tested")
    if train.get("time_budget_s"):
        parts.append(f"time budget {train['time_budget_s']:g} s per run")
    if result.get("preset_overridden"):
        parts.append("preset overridden: " + ", ".join(result["preset_overridden"]))
    return "".join(f"; {p}" for p in parts)


def markdown_report(result: dict[str, Any]) -> str:
    """The whole ``listops.md``: settings, machine and the table (written by the script)."""
    data, machine = result["data"], result["machine"]
    load = machine.get("load_average_1min")
    load_text = "load not recorded" if load is None else f"load average {load:.1f} at the start"
    cfg, train = data["config"], result["train"]
    return "\n".join(
        [
            "<!-- Written by `python -m benchmarks.listops`; do not edit by hand. -->",
            f"ListOps ({result['mode']} settings): {cfg['n_train']} / {cfg['n_valid']} / "
            f"{cfg['n_test']} train / valid / test expressions of {cfg['min_length']}–"
            f"{cfg['max_length']} tokens (mean {data['mean_length']['test']:.0f}), depth ≤ "
            f"{cfg['max_depth']}, ≤ {cfg['max_args']} arguments; {train['steps']} steps of "
            f"batch {train['batch_size']}, seed {result['seed']}{_settings(result)}. "
            f"Machine: {machine['description']}; torch {machine['torch']}, "
            f"{machine['threads']} thread(s) per run, {result.get('jobs', 1)} run(s) at a time, "
            f"{load_text}; "
            f"{result['total_seconds']:.0f} s in all. "
            f"Peak memory: {result['runs'][0]['memory_kind'] if result['runs'] else '-'}.",
            "",
            markdown_table(result),
            "",
            loss_note(result),
            "",
        ]
    )


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def write_all(result: dict[str, Any], out: Path) -> None:
    """``listops.json``, ``listops.png`` and ``listops.md`` into ``out``."""
    write_json(result, out / "listops.json")
    try:
        write_png(result, out / "listops.png")
    except ImportError as error:  # matplotlib is optional (e.g. on a bare GPU image)
        print(f"no plot: {error}")
    (out / "listops.md").write_text(markdown_report(result))


def write_png(result: dict[str, Any], path: Path) -> None:
    """Two panels: test accuracy per variant (majority baseline dashed) and steps/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [r["variant"] for r in runs]
    colors = ["tab:blue" if r["rdrop_alpha"] == 0 else "tab:orange" for r in runs]
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_acc.bar(names, [r["test_accuracy"] for r in runs], color=colors)
    base = result["data"]["majority_baseline"]["test_accuracy"]
    ax_acc.axhline(base, color="black", linestyle="--", label=f"majority class {base:.3f}")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0, max(0.5, 1.15 * max([r["test_accuracy"] for r in runs] + [base])))
    ax_acc.legend(loc="upper right")
    ax_speed.bar(names, [r["steps_per_second"] for r in runs], color=colors)
    ax_speed.set_ylabel("training steps / s")
    for ax in (ax_acc, ax_speed):
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(
        f"ListOps ({result['mode']}), {result['train']['steps']} steps; "
        "orange = with R-Drop; " + result["machine"]["description"],
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
