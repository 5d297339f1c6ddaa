"""Linear cost of ``benchmarks.linearize_minilm``'s converted attention at n = 1024..8192.

The attention module alone, with MiniLM's shape (12 heads x 32) and the converted kernel: the
Performer with Hedgehog maps (``--scaling``) or LoLCATs' hybrid with window 64 and Hedgehog
d_f = 32 (``--scaling-hybrid``). Forward time per token (median of ``repeats``, no_grad) in
this process, forward+backward peak memory per token in a fresh process
(``benchmarks.memory``, which imports this module's ``contenders``).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

import transformer_zoo
from transformer_zoo import HybridWindowAttention, PerformerAttention

SCALING_LENGTHS = (1024, 2048, 4096, 8192)
HEADS, HEAD_DIM = 12, 32


# -- linear cost of the converted attention ------------------------------------------------------
def converted_attention(kind: str = "performer") -> torch.nn.Module:
    """MiniLM's attention shape (12 heads x 32) with the converted kernel: the Performer with
    Hedgehog maps, or (``"hybrid"``) LoLCATs' hybrid with window 64 and Hedgehog d_f = 32."""
    if kind == "hybrid":
        return HybridWindowAttention(
            HEADS * HEAD_DIM, HEADS, window=64,
            feature_map=transformer_zoo.HedgehogFeatures(feature_dim=32)).eval()
    return PerformerAttention(HEADS * HEAD_DIM, HEADS,
                              feature_map=transformer_zoo.HedgehogFeatures()).eval()


def contenders() -> dict[str, Callable[[int], Callable[[], torch.Tensor]]]:
    """For ``benchmarks.memory``: forward+backward of the converted attention at length n."""

    def converted(n: int, kind: str = "performer") -> Callable[[], torch.Tensor]:
        torch.manual_seed(0)
        attn = converted_attention(kind)
        x = torch.randn(1, n, HEADS * HEAD_DIM, requires_grad=True)
        return lambda: attn(x)

    return {"converted_performer": converted,
            "converted_hybrid": functools.partial(converted, kind="hybrid")}


def scaling(lengths: tuple[int, ...] = SCALING_LENGTHS, repeats: int = 3,
            kind: str = "performer") -> dict:
    """Forward time per token (median of ``repeats``, no_grad) and fwd+bwd peak memory per
    token (fresh process) of the converted attention (``converted_attention(kind)``)."""
    from benchmarks.memory import measure_memory

    attn, rows = converted_attention(kind), []
    for n in lengths:
        x = torch.randn(1, n, HEADS * HEAD_DIM)
        with torch.no_grad():
            attn(x)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                attn(x)
                times.append(time.perf_counter() - start)
        mem = measure_memory("benchmarks.linearize_scaling", f"converted_{kind}", n,
                             threads=torch.get_num_threads())
        rows.append({"n": n, "forward_s": statistics.median(times),
                     "us_per_token": 1e6 * statistics.median(times) / n,
                     "peak_bytes": mem.get("peak_bytes"), "memory_error": mem.get("error"),
                     "bytes_per_token": None if mem.get("peak_bytes") is None
                     else mem["peak_bytes"] / n})
        print(f"n={n}: {rows[-1]['us_per_token']:.2f} us/token, "
              f"{(rows[-1]['bytes_per_token'] or 0) / 1024:.1f} KiB/token", flush=True)
    times = [r["us_per_token"] for r in rows]
    mems = [r["bytes_per_token"] for r in rows if r["bytes_per_token"]]
    return {"attention": repr(attn), "rows": rows,
            "time_ratio": max(times) / min(times),
            "memory_ratio": max(mems) / min(mems) if mems else None}
