"""Two dropout passes: one call on the doubled batch vs two calls on the batch.

R-Drop and SimCSE need two dropout samples of the same inputs. ``two_pass_forward`` runs the
model once on ``concat(x, x)``; the alternative is calling it twice. This times forward +
backward of both ways on the library ``Encoder`` in training mode, interleaved, and reports
the median ratio (compare ratios within one run, never absolute times across runs).

Run: ``python -m benchmarks.rdrop_two_pass`` (about a minute on 2 busy CPU cores); writes
``rdrop_two_pass.json`` and the Markdown table ``rdrop_two_pass.md`` beside it into
``benchmarks/runs/`` (untracked), or ``--out``; ``--update-results`` refreshes the committed
``benchmarks/results/rdrop_two_pass.*`` instead. ``--report-only`` re-renders the table from the
committed JSON (or the one given) without computing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.outputs import RESULTS, add_output_options, output_path
from transformer_zoo import Encoder, EncoderConfig
from transformer_zoo.functional import symmetric_kl
from transformer_zoo.regularizers import two_pass_forward

OUTPUT = "rdrop_two_pass.json"


def _step(model: torch.nn.Module, x: torch.Tensor, doubled: bool) -> float:
    start = time.perf_counter()
    if doubled:
        p, q = two_pass_forward(model, x)
    else:
        p, q = model(x), model(x)
    symmetric_kl(p, q).backward()
    return time.perf_counter() - start


def measure(*, batch: int = 8, seq: int = 128, d_model: int = 256, repeats: int = 7) -> dict:
    torch.manual_seed(0)
    config = EncoderConfig(d_model=d_model, n_heads=4, n_layers=2, dropout=0.1)
    model = Encoder(config).train()
    x = torch.randn(batch, seq, d_model)
    _step(model, x, True), _step(model, x, False)  # warm-up
    doubled, separate = [], []
    for _ in range(repeats):
        doubled.append(_step(model, x, True))
        separate.append(_step(model, x, False))
    result = {
        "config": {"batch": batch, "seq": seq, "d_model": d_model, "n_layers": 2},
        "threads": torch.get_num_threads(),
        "median_s_doubled": statistics.median(doubled),
        "median_s_two_calls": statistics.median(separate),
    }
    result["speedup"] = result["median_s_two_calls"] / result["median_s_doubled"]
    print(
        f"{result['threads']} thread(s), forward+backward, b={batch} n={seq} d={d_model}: "
        "doubled batch "
        f"{result['median_s_doubled'] * 1e3:.1f} ms, two calls "
        f"{result['median_s_two_calls'] * 1e3:.1f} ms, speedup {result['speedup']:.2f}x"
    )
    return result


def markdown(results: list[dict]) -> str:
    """One row per thread count: median forward + backward time of each way, and the ratio."""
    c = results[0]["config"]
    lines = [
        "<!-- Written by `python -m benchmarks.rdrop_two_pass`; do not edit by hand. -->",
        f"Forward + backward of a {c['n_layers']}-layer `Encoder` in training mode, "
        f"b = {c['batch']}, n = {c['seq']}, d = {c['d_model']}; median over interleaved "
        "repeats; speedup = two calls / doubled batch (compare within one run).",
        "",
        "| threads | doubled batch, ms | two calls, ms | speedup |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['threads']} | {r['median_s_doubled'] * 1e3:.1f} | "
                     f"{r['median_s_two_calls'] * 1e3:.1f} | {r['speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


def write_markdown(results: list[dict], *, path: Path) -> None:
    """``rdrop_two_pass.md`` beside the JSON ``path``."""
    path.with_suffix(".md").write_text(markdown(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the Markdown table from a JSON (default: "
                        "the committed one) into the output location (no computing)")
    add_output_options(parser, OUTPUT)  # the JSON; the .md goes beside it
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(results, path=out)
        return results
    return measure_all(out)


def measure_all(out: Path) -> list[dict]:
    """Measure with one thread, then with the default thread count; write the JSON ``out``
    and the table beside it."""
    threads = torch.get_num_threads()
    results = []
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        results.append(measure())
    torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, path=out)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
