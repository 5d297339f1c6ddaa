"""Plumbing of ``benchmarks/attention.py``, kept apart so the harness stays short: the
contender table (``all_contenders``, ``unavailable``), the options
(``parse_args``) and the partial results (``write_partial``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.attention_report import Results
from benchmarks.common import ContenderFactory
from benchmarks.device import add_device_options, device_info
from benchmarks.outputs import add_output_options

OUTPUT = "attention.json"


def write_partial(out: Path, args: argparse.Namespace, results: Results, n: int) -> None:
    """After each length, what is measured so far (``<out>.partial.json``, removed when the
    run completes): a run killed by a time cap still leaves its numbers."""
    partial = out.with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps({
        "complete": False, "done_up_to_length": n,
        "config": device_info(args.device, args.dtype),
        "results": {nm: {str(k): r for k, r in per.items()} for nm, per in results.items()},
    }, indent=1) + "\n")


def parse_args(argv: list[str] | None, doc: str | None = None) -> argparse.Namespace:
    """The benchmark's options (``doc``: the harness's docstring, for --help)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per length (minimum)")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="keep adding rounds (up to 20x repeats) until every contender has "
                        "spent this long in timed steps at a length")
    p.add_argument("--contenders", nargs="+", metavar="NAME",
                   help="only these contenders (default: all found)")
    add_output_options(p, OUTPUT)  # the JSON; the .md and .png go beside it
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for one memory subprocess; a contender that fails or times "
                        "out there is not timed at that length")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--max-step-seconds", type=float, default=5.0,
                   help="a contender whose one step took longer is skipped at longer lengths")
    p.add_argument("--error-lengths", type=int, nargs="*", default=[1024],
                   help="lengths for the optional error hooks (give none to skip)")
    add_device_options(p)
    return p.parse_args(argv)


def all_contenders(modules: list[ModuleType]) -> dict[str, tuple[str, ContenderFactory]]:
    """name -> (module name, factory), in module order."""
    table: dict[str, tuple[str, ContenderFactory]] = {}
    for module in modules:
        for name, factory in module.contenders().items():
            if name in table:
                raise ValueError(f"contender {name!r} defined by {table[name][0]} and "
                                 f"{module.__name__}")
            table[name] = (module.__name__, factory)
    return table


def unavailable(modules: list[ModuleType], device: torch.device) -> dict[str, str]:
    """name -> why it cannot run on ``device`` (the modules' optional ``unavailable`` hook)."""
    return {name: why for m in modules if hasattr(m, "unavailable")
            for name, why in m.unavailable(device).items()}
