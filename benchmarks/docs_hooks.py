"""mkdocs hook: publish the committed benchmark plots as ``results/<name>.png`` on the site.

The plots stay where the scripts write them (``benchmarks/results/``); the docs pages link to
``results/<name>.png`` and include the script-written Markdown tables with ``--8<--``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent / "results"


def on_files(files: Files, config: Any) -> Files:
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{plot.name}", abs_src_path=str(plot)))
    return files
