"""Positional-encoding benchmark: RoPE application and the logit-bias builders.

RoPE: rotate q and k (b = 1, 8 heads, n = 8192, head_dim 64; fp32 and bf16; both layouts),
forward and forward+backward, against the peers that exist for each layout:

- interleaved: rotary-embedding-torch (``rotate_queries_or_keys``, its cached frequencies)
  and a torchtune-style application (torchtune is not installed: ``TorchtuneStyleRoPE``
  below is a small reimplementation of the application in torchtune 0.6's
  ``RotaryPositionalEmbeddings``: a precomputed (max_seq_len, d/2, 2) cos/sin cache, input
  upcast to fp32, stacked pair formula, (b, n, h, d) layout);
- half-split: HF transformers' Llama (``LlamaRotaryEmbedding`` cos/sin from position ids,
  then ``apply_rotary_pos_emb``).

Bias builders (b = 1, 8 heads, n = m = 2048 by default: a full (1, h, n, m) fp32 bias at
n = 8192 is 2 GiB): T5 against HF ``T5Attention.compute_bias``; ALiBi and Shaw have no
installed peer that builds the same tensor (HF Bloom's ``build_alibi_tensor`` builds the
per-key (b·h, 1, m) form, listed for reference).

Timing: each comparison group runs in a fresh process (no group inherits another's allocator
state); its contenders alternate within each round; we report the minimum and the median over
rounds (ms). Compare ratios within one run only. ``--device cuda`` builds every module and
input on the GPU (the group runs under ``torch.device(device)``) and times each call with CUDA
events after a synchronize (``benchmarks/device.py``); ``--dtype`` picks the RoPE input dtypes
(default fp32 and bf16; the bias builders make fp32 biases). The JSON's ``meta`` names the
device and the CPU. Results: a table on stdout, and
``positional.json`` with its Markdown tables ``positional_rope.md`` and ``positional_bias.md``
in ``benchmarks/runs/`` (untracked; ``--quick``: ``positional-quick*``), or ``--out``;
``--update-results`` refreshes the committed ``benchmarks/results/positional*`` instead.

Run: ``python -m benchmarks.positional [--quick] [--device cuda] [--dtype fp32 bf16 fp16]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import CPU
from benchmarks.device import DTYPES, cpu_model, device_name, parse_device, timer
from benchmarks.outputs import RESULTS, add_output_options, output_path
from transformer_zoo import (
    ALiBi,
    RotaryEmbedding,
    RotaryLayout,
    ShawRelativePosition,
    T5RelativeBias,
)

OUTPUT, QUICK_OUTPUT = "positional.json", "positional-quick.json"
HEADS, HEAD_DIM = 8, 64


class TorchtuneStyleRoPE:
    """Reimplementation of torchtune's ``RotaryPositionalEmbeddings`` application (labelled
    as such; torchtune is not installed). Interleaved pairs; input ``(b, n, h, d)``."""

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        idx_theta = torch.einsum("i,j->ij", torch.arange(max_seq_len).float(), theta)
        self.cache = torch.stack([idx_theta.cos(), idx_theta.sin()], dim=-1)  # (n, d/2, 2)

    def __call__(self, x: Tensor) -> Tensor:
        seq_len = x.size(1)
        rope_cache = self.cache[:seq_len]
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
        rope_cache = rope_cache.view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out = torch.stack(
            [
                xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
                xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
            ],
            -1,
        )
        return x_out.flatten(3).type_as(x)


def rope_contenders(n: int, dtype: torch.dtype) -> dict[str, dict[str, Callable]]:
    """layout -> name -> make(q, k) returning a function that rotates both."""
    pos = torch.arange(n)
    out: dict[str, dict[str, Callable]] = {"interleaved": {}, "half_split": {}}
    for layout, key in ((RotaryLayout.INTERLEAVED, "interleaved"),
                        (RotaryLayout.HALF_SPLIT, "half_split")):
        rope = RotaryEmbedding(head_dim=HEAD_DIM, layout=layout)
        out[key]["transformer_zoo"] = lambda q, k, rope=rope: (lambda: rope(q, k, pos, pos))
    try:
        import rotary_embedding_torch

        peer = rotary_embedding_torch.RotaryEmbedding(HEAD_DIM, cache_max_seq_len=max(n, 8192))
        out["interleaved"]["rotary-embedding-torch"] = lambda q, k: (
            lambda: (peer.rotate_queries_or_keys(q), peer.rotate_queries_or_keys(k)))
    except ImportError:
        pass
    tt = TorchtuneStyleRoPE(HEAD_DIM, n)

    def torchtune(q: Tensor, k: Tensor) -> Callable:
        # its own (b, n, h, d) layout, as leaves of their own
        qt, kt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)
                  for t in (q, k))
        return lambda: (tt(qt), tt(kt))

    out["interleaved"]["torchtune-style (reimpl.)"] = torchtune
    try:
        from transformers import LlamaConfig
        from transformers.models.llama import modeling_llama

        config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                             head_dim=HEAD_DIM)
        rotary = modeling_llama.LlamaRotaryEmbedding(config)
        ids = pos[None]

        def llama(q: Tensor, k: Tensor) -> Callable:
            def step() -> tuple[Tensor, Tensor]:
                cos, sin = rotary(q, ids)
                return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
            return step

        out["half_split"]["HF Llama"] = llama
    except ImportError:
        pass
    return out


def bias_contenders(n: int) -> dict[str, dict[str, Callable[[], Tensor]]]:
    pos = torch.arange(n)
    q = torch.randn(1, HEADS, n, HEAD_DIM)
    t5 = T5RelativeBias(n_heads=HEADS)
    alibi = ALiBi(n_heads=HEADS)
    shaw = ShawRelativePosition(head_dim=HEAD_DIM, max_distance=16)
    weights = torch.softmax(torch.randn(1, HEADS, n, n), dim=-1)
    out: dict[str, dict[str, Callable[[], Tensor]]] = {
        "T5 bias": {"transformer_zoo": lambda: t5(q, pos, pos)},
        "ALiBi bias": {"transformer_zoo": lambda: alibi(q, pos, pos)},
        "Shaw logit term": {"transformer_zoo": lambda: shaw(q, pos, pos)},
        "Shaw value term": {"transformer_zoo": lambda: shaw.value_term(weights, pos, pos)},
    }
    try:
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Attention

        hf = T5Attention(T5Config(num_heads=HEADS, d_model=HEADS * HEAD_DIM, d_kv=HEAD_DIM),
                         has_relative_attention_bias=True)
        out["T5 bias"]["HF T5 compute_bias"] = lambda: hf.compute_bias(n, n)
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        ones = torch.ones(1, n, dtype=torch.long)
        out["ALiBi bias"]["HF Bloom per-key (b·h,1,m), not same"] = (
            lambda: build_alibi_tensor(ones, HEADS, torch.float32))
    except ImportError:
        pass
    return out


def time_rounds(steps: dict[str, Callable[[], object]], rounds: int,
                device: torch.device = CPU) -> dict[str, dict]:
    """min and median ms per contender; CUDA events on CUDA, the wall clock otherwise."""
    clock = timer(device) if device.type == "cuda" else None
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm up (caches, allocator)
        step()
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            if clock is not None:
                times[name].append(clock(step) * 1e3)
                continue
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"min_ms": min(t), "median_ms": statistics.median(t)} for name, t in
            times.items()}


def run_rope(n: int, rounds: int, dtype_name: str, layout: str, mode: str,
             device: torch.device = CPU) -> list[dict]:
    dtype = getattr(torch, dtype_name)
    grad = mode == "fwd+bwd"
    steps = {}
    for name, make in rope_contenders(n, dtype)[layout].items():
        q = torch.randn(1, HEADS, n, HEAD_DIM, dtype=dtype, requires_grad=grad)
        k = torch.randn(1, HEADS, n, HEAD_DIM, dtype=dtype, requires_grad=grad)
        fn = make(q, k)
        if grad:
            def step(fn=fn) -> None:
                a, b = fn()
                (a.sum() + b.sum()).backward()
            steps[name] = step
        else:
            steps[name] = torch.no_grad()(fn)
    return [dict(block="RoPE", layout=layout, dtype=dtype_name, mode=mode, contender=name, n=n,
                 **t) for name, t in time_rounds(steps, rounds, device).items()]


def run_bias(n: int, rounds: int, block: str,
             device: torch.device = CPU) -> list[dict]:
    with torch.no_grad():
        timed = time_rounds(bias_contenders(n)[block], rounds, device)
    return [dict(block=block, layout="", dtype="float32", mode="fwd", contender=name, n=n, **t)
            for name, t in timed.items()]


def run_group(group: tuple, args: argparse.Namespace) -> list[dict]:
    """One comparison group (all its contenders, alternating), from a fresh state."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.device(args.device):  # modules, caches and inputs all on the device
        if group[0] == "RoPE":
            return run_rope(args.seq, args.rounds, *group[1:], device=args.device)
        return run_bias(args.bias_seq, args.rounds, group[1], device=args.device)


def groups(dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[tuple]:
    """The comparison groups: RoPE per input dtype (``--dtype`` names), layout and mode,
    then the bias builders."""
    names = [str(DTYPES[d]).removeprefix("torch.") for d in dtypes]
    rope = [("RoPE", dtype, layout, mode) for dtype in names
            for layout in ("interleaved", "half_split") for mode in ("fwd", "fwd+bwd")]
    bias = [("bias", block) for block in
            ("T5 bias", "ALiBi bias", "Shaw logit term", "Shaw value term")]
    return rope + bias


def add_ratios(rows: list[dict]) -> None:
    """ratio = our min time / the fastest peer's min time, per group (lower is better)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["block"], r["layout"], r["dtype"], r["mode"]), []).append(r)
    for group in groups.values():
        peers = [r["min_ms"] for r in group
                 if r["contender"] != "transformer_zoo" and "not same" not in r["contender"]]
        for r in group:
            r["vs_fastest_peer"] = (r["min_ms"] / min(peers)) if peers else None


def table(rows: list[dict]) -> str:
    head = f"{'block':<16}{'layout':<12}{'dtype':<10}{'mode':<9}{'contender':<36}" \
           f"{'min ms':>9}{'median':>9}{'÷peer':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r["vs_fastest_peer"] is None else f"{r['vs_fastest_peer']:.2f}"
        lines.append(f"{r['block']:<16}{r['layout']:<12}{r['dtype']:<10}{r['mode']:<9}"
                     f"{r['contender']:<36}{r['min_ms']:>9.2f}{r['median_ms']:>9.2f}{ratio:>8}")
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict, block: str) -> str:
    """One Markdown table (RoPE rows, or the bias builders) for the docs to include."""
    pick = [r for r in rows if (r["block"] == "RoPE") == (block == "RoPE")]
    a = meta["args"]
    n = a["seq"] if block == "RoPE" else a["bias_seq"]
    device = meta.get("device", "cpu")  # JSON from before --device: the CPU
    where = "" if device == "cpu" else f"{meta.get('device_name', device)} ({device}), "
    lines = [
        "<!-- Written by `python -m benchmarks.positional`; do not edit by hand. -->",
        f"b = 1, h = 8, n = {n}, head_dim 64; {where}torch {meta['torch']}, {meta['threads']} "
        "thread(s), "
        f"a fresh process per comparison, {a['rounds']} rounds; min and median ms; ÷peer = ours "
        "/ the fastest peer (min times).",
        "",
        "| block | layout | dtype | mode | contender | min ms | median ms | ÷peer |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in pick:
        ratio = "" if r["vs_fastest_peer"] is None else f"{r['vs_fastest_peer']:.2f}"
        lines.append(f"| {r['block']} | {r['layout']} | {r['dtype']} | {r['mode']} | "
                     f"{r['contender']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: list[dict], meta: dict) -> None:
    """``positional_rope.md`` and ``positional_bias.md`` beside the JSON."""
    for block in ("RoPE", "bias"):
        out = path.with_name(f"{path.stem}_{block.lower()}.md")
        out.write_text(markdown(rows, meta, block))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="RoPE sequence length")
    parser.add_argument("--bias-seq", type=int, default=2048, help="bias builders' length")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="n=1024, bias n=256, 3 rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is steadier on a shared machine)")
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"),
                        help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"],
                        help="RoPE input dtypes (default fp32 bf16)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every group in this process (default: a fresh process each, "
                        "so no group inherits another's allocator state)")
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the Markdown tables from a JSON (default: "
                        "the committed one) into the output location (no computing)")
    add_output_options(parser, f"{OUTPUT} (--quick: {QUICK_OUTPUT})", committed=OUTPUT)
    args = parser.parse_args(argv)
    if args.update_results and args.quick:
        parser.error("--update-results: --quick runs are not committed results")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = output_path(args, QUICK_OUTPUT if args.quick else OUTPUT, committed=OUTPUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads(args.report_only.read_text())
        write_markdown(path, saved["rows"], saved["meta"])
        print(f"wrote the Markdown tables beside {path}")
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seq, args.bias_seq, args.rounds = 1024, 256, 3
    rows: list[dict] = []
    for group in groups(tuple(args.dtype)):
        if args.in_process:
            rows += run_group(group, args)
        else:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows += pool.apply(run_group, (group, args))
    add_ratios(rows)
    print(table(rows))
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.machine(), processor=platform.processor(),
                device=str(args.device), device_name=device_name(args.device),
                cpu_model=cpu_model(),
                args={k: str(v) if isinstance(v, torch.device) else v
                      for k, v in vars(args).items()
                      if k not in ("out", "update_results", "report_only")})
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    write_markdown(path, rows, meta)
    print(f"saved {path} and its Markdown tables")


if __name__ == "__main__":
    main()
