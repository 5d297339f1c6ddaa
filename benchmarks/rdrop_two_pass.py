"""Two dropout passes: one call on the doubled batch vs two calls on the batch.

R-Drop and SimCSE need two dropout samples of the same inputs. ``two_pass_forward`` runs the
model once on ``concat(x, x)``; the alternative is calling it twice. This times forward +
backward of both ways on the library ``Encoder`` in training mode, interleaved, and reports
the median ratio (compare ratios within one run, never absolute times across runs).

Run: ``python -m benchmarks.rdrop_two_pass`` (about a minute on 2 busy CPU cores); writes
``benchmarks/results/rdrop_two_pass.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from transformer_zoo import Encoder, EncoderConfig
from transformer_zoo.functional import symmetric_kl
from transformer_zoo.regularizers import two_pass_forward

RESULTS = Path(__file__).parent / "results" / "rdrop_two_pass.json"


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


def main() -> list[dict]:
    """Measure with one thread, then with the default thread count."""
    threads = torch.get_num_threads()
    results = []
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        results.append(measure())
    torch.set_num_threads(threads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
