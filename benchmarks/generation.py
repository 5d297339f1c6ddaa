"""Generation cost per token: HF sdpa's KV cache vs FAVOR+'s recurrent state (issue 19).

A randomly initialised Llama (4 layers, hidden 256, 4 heads, MLP 1024, vocab 1024), greedy
decoding one token at a time through HF's cache (``model(token, cache=cache, use_cache=True)``
in a loop: what ``generate()`` runs per token, without its bookkeeping), batch 1, fp32, CPU:

- ``HF sdpa``: the model's own attention with its ``DynamicCache`` (keys and values grow);
- ``ours, recurrent state``: ``huggingface.use(model, "performer", nb_features=64)``: each
  layer keeps FAVOR+'s fixed-size state (``interop/hf_cache.py``);
- ``ours, KV cache (before)``: the same kernel with ``recurrent_cache=False``, as before issue
  19 (the features of every cached key recomputed per token); timed only up to
  ``--kv-performer-max`` tokens (default 2048: it is slow).

At each cache length L (64 … 8192 tokens) the cache is what L generated tokens leave: ours
prefilled on L random tokens (the recurrent state), the KV caches filled with random keys and
values of length L (a decode step's cost depends on the length only; a real prefill would be
quadratic). Then ``--tokens`` rounds each time one greedy token (``time.perf_counter`` around
one forward and the argmax) on every (contender, L) in turn — interleaved token by token, so
every cell sees the same load — and the median per cell is reported, with the cache's bytes
(``hf_cache.cache_nbytes``: keys + values, or the states). One table per thread count (default
1, then 2). Ratios within one table are meaningful; absolute times depend on the machine and
its load (recorded: ``os.getloadavg``). On a machine with more runnable processes than cores, 2
threads measure OpenMP wake-ups: an elementwise op on 256 numbers (``exp``) waits ~20 ms for
the second thread instead of taking 4 µs, which punishes many small ops (a decode step) over
few large ones.

Run: ``python -m benchmarks.generation`` (a few minutes); writes
``generation.json``, ``generation.md`` and ``generation.png`` into ``benchmarks/runs/``
(untracked), or ``--out``; ``--update-results`` refreshes the committed
``benchmarks/results/generation.*``. ``--report-only`` re-renders from the committed JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.outputs import RESULTS, add_output_options, output_path

OUTPUT = "generation.json"
WINDOWS = (64, 512, 1024, 2048, 4096, 8192)  # window ends, in generated tokens
MODEL = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
             intermediate_size=1024, vocab_size=1024)
SDPA, OURS, OURS_KV = "HF sdpa", "ours, recurrent state", "ours, KV cache (before)"


def build(name: str, *, nb_features: int = 64, model: dict | None = None, max_len: int = 8192):
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformer_zoo.interop import huggingface

    torch.manual_seed(0)
    config = LlamaConfig(**(model or MODEL), max_position_embeddings=max_len + 64,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
    llama = LlamaForCausalLM(config).eval()
    if name == SDPA:
        llama.set_attn_implementation("sdpa")
    else:
        huggingface.use(llama, "performer", nb_features=nb_features, seed=0,
                        recurrent_cache=name == OURS)
    return llama


def fill(model, length: int, name: str):
    """A cache holding ``length`` tokens, as after generating them: ours prefilled on random
    tokens (linear in the length: the recurrent state), a KV cache filled with random keys and
    values of that length (its per-token cost depends on the length only, and a real prefill
    would be quadratic)."""
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(length)
    if name == OURS:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
        return model(ids, use_cache=True).cache
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        k, v = (torch.randn(1, config.num_key_value_heads, length, head_dim, generator=g)
                for _ in range(2))
        cache.update(k, v, layer)
    return cache


@torch.inference_mode()
def time_token(model, cache, token: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy token (a forward and the argmax) on ``cache``; the next token."""
    start = time.perf_counter()
    out = model(token, cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start, token


def measure(*, tokens: int = 24, kv_performer_max: int = 2048, nb_features: int = 64,
            windows: tuple[int, ...] = WINDOWS, model: dict | None = None) -> dict:
    """At each length L in ``windows`` the cache after L tokens; then ``tokens`` rounds, each
    timing one greedy token on every (contender, L) in turn — interleaved token by token, so
    every cell sees the same load — and the median per cell."""
    from transformer_zoo.interop.hf_cache import cache_nbytes

    load_before = os.getloadavg()
    names = [SDPA, OURS] + ([OURS_KV] if kv_performer_max > 0 else [])
    models = {name: build(name, nb_features=nb_features, model=model, max_len=windows[-1])
              for name in names}
    cells = [(name, length) for length in windows for name in names
             if not (name == OURS_KV and length > kv_performer_max)]
    runs = {name: {"median_ms": {}, "mean_ms": {}, "cache_bytes": {}} for name in names}
    caches, next_token, times = {}, {}, {cell: [] for cell in cells}
    with torch.inference_mode():
        for name, length in cells:
            caches[name, length] = fill(models[name], length, name)
            runs[name]["cache_bytes"][str(length)] = cache_nbytes(caches[name, length])
            next_token[name, length] = torch.zeros(1, 1, dtype=torch.long)
    for round_ in range(tokens + 2):  # 2 warm-up rounds
        for cell in cells:
            seconds, next_token[cell] = time_token(models[cell[0]], caches[cell], next_token[cell])
            if round_ >= 2:
                times[cell].append(seconds)
    for (name, length), ts in times.items():
        runs[name]["median_ms"][str(length)] = 1e3 * statistics.median(ts)
        runs[name]["mean_ms"][str(length)] = 1e3 * statistics.fmean(ts)
    for name, run in runs.items():
        print(name, {k: round(v, 2) for k, v in run["median_ms"].items()}, flush=True)
    return {
        "model": model or MODEL, "nb_features": nb_features, "batch": 1, "dtype": "float32",
        "threads": torch.get_num_threads(), "windows": list(windows), "timed_tokens": tokens,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "runs": runs,
    }


def targets(results: dict) -> list[str]:
    """The issue's three targets, judged on this run."""
    runs, lines = results["runs"], []
    ours, sdpa = runs.get(OURS), runs.get(SDPA)
    if ours is None:
        return lines
    ms = [ours["median_ms"][str(w)] for w in results["windows"] if str(w) in ours["median_ms"]]
    flat = max(ms) / min(ms)
    lines.append(f"- ours flat within 1.2x from {results['windows'][0]} to "
                 f"{results['windows'][-1]} tokens: {'met' if flat <= 1.2 else 'MISSED'} "
                 f"(max / min {flat:.2f}x)")
    mem = set(ours["cache_bytes"].values())
    lines.append(f"- state memory constant: {'met' if len(mem) == 1 else 'MISSED'} "
                 f"({', '.join(_mib(b) for b in sorted(mem))})")
    if sdpa is not None:
        late = [w for w in results["windows"] if w >= 2048 and str(w) in ours["median_ms"]
                and str(w) in sdpa["median_ms"]]
        ratios = [sdpa["median_ms"][str(w)] / ours["median_ms"][str(w)] for w in late]
        verdict = "met" if ratios and min(ratios) > 1 else "MISSED"
        shown = ", ".join(f"{w}: {r:.2f}x" for w, r in zip(late, ratios, strict=True))
        lines.append(f"- faster per token than HF sdpa from 2048 tokens on: {verdict} "
                     f"(sdpa / ours: {shown})")
    return lines


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def markdown_one(results: dict) -> str:
    windows = results["windows"]
    head = ("| attention | " + " | ".join(f"{w}" for w in windows)
            + f" | cache at {windows[-1]} |")
    lines = [f"**{results['threads']} CPU thread{'s' if results['threads'] > 1 else ''}** "
             f"(load average {results['loadavg_before'][0]:.1f} before, "
             f"{results['loadavg_after'][0]:.1f} after): ms per token with L tokens in the "
             f"cache, median of {results['timed_tokens']} tokens", "",
             head, "|---|" + "---|" * (len(windows) + 1)]
    for name, run in results["runs"].items():
        cells = [f"{run['median_ms'][str(w)]:.2f}" if str(w) in run["median_ms"] else "—"
                 for w in windows]
        last = max(int(k) for k in run["cache_bytes"])
        memory = _mib(run["cache_bytes"][str(last)]) + (
            "" if last == windows[-1] else f" (at {last})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {memory} |")
    return "\n".join([*lines, "", *targets(results)])


def markdown(all_results: list[dict]) -> str:
    m, first = all_results[0]["model"], all_results[0]
    note = (f"Random Llama ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
            f"{m['num_attention_heads']} heads, MLP {m['intermediate_size']}, vocab "
            f"{m['vocab_size']}), greedy, batch 1, {first['dtype']}, Performer nb_features="
            f"{first['nb_features']}; each token timed alone, every (attention, L) interleaved "
            "token by token (a shared machine: compare within one table).")
    return "\n\n".join([*(markdown_one(r) for r in all_results), note]) + "\n"


def report(all_results: list[dict], out: Path) -> None:
    table = markdown(all_results)
    out.with_suffix(".md").write_text(table)
    print(table)
    try:
        import matplotlib
    except ImportError as error:  # optional: the table and JSON are written
        print(f"no plot: {error}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results) + 1, figsize=(5 * len(all_results) + 5, 4))
    for ax, results in zip(axes, all_results, strict=False):
        for name, run in results["runs"].items():
            ax.plot([int(k) for k in run["median_ms"]], list(run["median_ms"].values()),
                    marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="tokens in the cache (L)",
               ylabel="ms / token (median)", title=f"{results['threads']} CPU thread(s)")
    for name, run in all_results[0]["runs"].items():
        axes[-1].plot([int(k) for k in run["cache_bytes"]],
                      [b / 2**20 for b in run["cache_bytes"].values()], marker="o", label=name)
    axes[-1].set(xscale="log", yscale="log", xlabel="tokens in the cache (L)", ylabel="MiB",
                 title="cache / state memory")
    for ax in axes:
        ax.set_xticks(all_results[0]["windows"], [str(w) for w in all_results[0]["windows"]])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[24, 8],
                        help="tokens timed at each length, one per thread count (the last "
                        "repeats; default 24 with 1 thread, 8 with 2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(WINDOWS),
                        help="cache lengths L (default 64 512 1024 2048 4096 8192)")
    parser.add_argument("--kv-performer-max", type=int, default=2048,
                        help="longest L for the Performer on the KV cache (0: skip it)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch CPU thread counts, one table each (default 1 2)")
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the table and plot from a JSON "
                        "(default: the committed one) into the output location")
    add_output_options(parser, OUTPUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
    else:
        threads, results = torch.get_num_threads(), []
        for i, n in enumerate(args.threads):
            torch.set_num_threads(n)
            tokens = args.tokens[min(i, len(args.tokens) - 1)]
            results.append(measure(tokens=tokens, windows=tuple(args.lengths),
                                   kv_performer_max=args.kv_performer_max))
        torch.set_num_threads(threads)
        out.write_text(json.dumps(results, indent=1) + "\n")
    report(results, out)
    return results


if __name__ == "__main__":
    main()
