"""Where a benchmark script writes: an untracked folder, unless the committed results are asked for.

``benchmarks/results/`` holds the committed numbers that the docs include. A user's run never
rewrites them (nor any other tracked file). Every script that writes results takes:

- no option: write into ``benchmarks/runs/`` (untracked: it is in ``.gitignore``);
- ``--out PATH``: write there (anywhere but ``benchmarks/results/``);
- ``--update-results``: refresh the committed files in ``benchmarks/results/`` (what a
  maintainer runs before committing new numbers).

Scripts that re-render a table with ``--report-only`` read the committed JSON by default and
write by the same rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # committed; the docs include these
RUNS = HERE / "runs"  # a user's runs; never committed


def add_output_options(
    parser: argparse.ArgumentParser, default: str, committed: str | None = None
) -> None:
    """``--out`` and ``--update-results`` (one or the other). ``default``: the script's output
    (a file, or a folder) inside ``benchmarks/runs/``; ``committed``: its committed
    counterpart inside ``benchmarks/results/`` (default: the same name)."""
    committed = default if committed is None else committed
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--out", type=Path, default=None,
        help=f"where to write (default: benchmarks/runs/{default}, untracked)",
    )
    group.add_argument(
        "--update-results", action="store_true",
        help=f"refresh the committed benchmarks/results/{committed} (and what is written beside "
        "it) instead",
    )


def is_committed_location(path: Path) -> bool:
    """Whether ``path`` is inside ``benchmarks/results/``."""
    return path.resolve().is_relative_to(RESULTS)


def output_path(args: argparse.Namespace, default: str, committed: str | None = None) -> Path:
    """``benchmarks/results/<committed>`` with ``--update-results``, else ``--out``, else
    ``benchmarks/runs/<default>`` (``committed`` defaults to ``default``). ``--out`` into
    ``benchmarks/results/`` is refused: refreshing the committed results takes the flag."""
    if args.update_results:
        return RESULTS / (default if committed is None else committed)
    if args.out is None:
        return RUNS / default
    if is_committed_location(args.out):
        raise SystemExit(
            f"--out {args.out}: benchmarks/results/ holds the committed results; pass "
            "--update-results to refresh them"
        )
    return args.out
