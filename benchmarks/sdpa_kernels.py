"""Which SDPA kernel runs: our SoftmaxAttention against a plain scaled_dot_product_attention.

    python -m benchmarks.sdpa_kernels --device cuda --dtype bf16

The GPU target: our module's attention runs the SDPA kernel that a plain
``F.scaled_dot_product_attention`` call on the same shapes gets (flash, memory-efficient,
cuDNN or math). For each case (no mask; a key padding mask, True = real token for us and
True = attend for SDPA; causal), one forward+backward of ``SoftmaxAttention(512, 8)`` on
x ``(1, n, 512)`` and one of the plain call on q, k, v ``(1, 8, n, 64)`` run under
``torch.profiler`` (CPU activity: the dispatcher records the backend op, on every device),
with the forward under autocast for ``--dtype`` bf16 / fp16. The aten operators whose names
hold ``attention`` (``aten::_scaled_dot_product_flash_attention``,
``..._efficient_attention``, ``..._cudnn_attention``, ``..._attention_math``, and their
backward ops) are listed per side; ``same`` says whether the two sets agree.
Results: ``benchmarks/runs/sdpa_kernels.json`` and ``.md`` (untracked), or ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import D_MODEL, HEAD_DIM, HEADS
from benchmarks.device import add_device_options, autocast, device_info
from benchmarks.outputs import add_output_options, output_path
from transformer_zoo import SoftmaxAttention

OUTPUT = "sdpa_kernels.json"
CASES = ("no mask", "key padding", "causal")


def attention_ops(fn: Callable[[], torch.Tensor]) -> list[str]:
    """The aten ``*attention*`` operators that one ``fn().sum().backward()`` dispatches."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn().float().sum().backward()
    names = {event.key for event in prof.key_averages()}
    return sorted(n for n in names if n.startswith("aten::") and "attention" in n)


def case_steps(case: str, n: int, device: torch.device, dtype: str
               ) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(ours, plain) zero-argument steps for one case on ``device``."""
    causal = case == "causal"
    module = SoftmaxAttention(D_MODEL, HEADS, causal=causal).to(device)
    x = torch.randn(1, n, D_MODEL, device=device, requires_grad=True)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=device, requires_grad=True)
               for _ in range(3))
    mask = None
    if case == "key padding":
        mask = torch.ones(1, n, dtype=torch.bool, device=device)
        mask[:, n - n // 4:] = False

    def ours() -> torch.Tensor:
        with autocast(device, dtype):
            return module(x, mask=mask)

    def plain() -> torch.Tensor:
        with autocast(device, dtype):
            attn_mask = None if mask is None else mask[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)

    return ours, plain


def probe(n: int, device: torch.device, dtype: str) -> dict[str, dict]:
    out = {}
    for case in CASES:
        ours, plain = case_steps(case, n, device, dtype)
        ours(), plain()  # warm up (lazy init, kernel selection caches)
        a, b = attention_ops(ours), attention_ops(plain)
        out[case] = {"ours": a, "plain sdpa": b, "same": a == b}
    return out


def markdown(report: dict) -> str:
    info = report["device"]
    lines = [
        "<!-- Written by `python -m benchmarks.sdpa_kernels`; do not edit by hand. -->",
        f"SDPA operators of one forward+backward, n = {report['n']}, {info['dtype']}, on "
        f"{info['device_name']} ({info['device']}); torch {info['torch']}.",
        "",
        "| case | SoftmaxAttention | plain F.sdpa | same |",
        "|---|---|---|---|",
    ]
    for case, r in report["cases"].items():
        lines.append(f"| {case} | {', '.join(r['ours'])} | {', '.join(r['plain sdpa'])} | "
                     f"{'yes' if r['same'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024, help="sequence length")
    add_device_options(p)
    add_output_options(p, OUTPUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    torch.manual_seed(0)
    report = {"n": args.n, "device": device_info(args.device, args.dtype),
              "cases": probe(args.n, args.device, args.dtype)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
