"""Every ```python block in README.md and docs/**/*.md runs, and mkdocs.yml's nav is sound.

Blocks of one file run in order in one namespace (a file is one test), with the repo root as
the working directory, on CPU. Blocks fenced as ```text, ```bash or anything else are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

# An opening fence (``` or ~~~, optionally indented) with its info string, up to the same fence.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n(?P<body>.*?)"
    r"^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each fenced block whose language is ``python`` or ``py``."""
    blocks = []
    for match in FENCE.finditer(text):
        words = match["info"].strip().split()
        language = words[0].lstrip(".{").lower() if words else ""
        if language in ("python", "py"):
            line = text.count("\n", 0, match.start()) + 2  # first line of the body
            indent = match["indent"]
            body = "\n".join(
                row[len(indent) :] if row.startswith(indent) else row
                for row in match["body"].split("\n")
            )
            blocks.append((line, body))
    return blocks


def test_python_blocks_parser() -> None:
    text = (
        "intro\n```python\nx = 1\n```\n```text\nnot run\n```\n"
        "```bash\necho no\n```\n- item\n\n    ```py\n    y = x + 1\n    ```\n"
        "~~~python\nz = 3\n~~~\n"
    )
    assert python_blocks(text) == [(3, "x = 1\n"), (14, "y = x + 1\n"), (17, "z = 3\n")]


@pytest.mark.cpu_only
@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_snippets_run(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {"__name__": f"snippets:{path.name}"}
    torch.manual_seed(0)
    for line, code in blocks:
        where = f"{path.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as err:  # name the block that failed, keep the traceback
            raise AssertionError(f"python block at {where} failed: {err!r}") from err


def _nav_files(node: object) -> list[str]:
    if isinstance(node, str):
        return [] if "://" in node else [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def _load_mkdocs_nav() -> list[str]:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold !!python/name tags; ignore them
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)
    return _nav_files(config.get("nav", []))


def test_mkdocs_nav_matches_docs() -> None:
    nav = _load_mkdocs_nav()
    docs = ROOT / "docs"
    missing = [f for f in nav if not (docs / f).is_file()]
    assert not missing, f"mkdocs.yml nav names files that do not exist under docs/: {missing}"
    pages = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}
    orphans = sorted(pages - set(nav))
    assert not orphans, f"docs pages missing from mkdocs.yml nav (add a line each): {orphans}"
    assert len(nav) == len(set(nav)), f"duplicate nav entries: {nav}"


def _features_table(text: str) -> str:
    start = text.index("| block |", text.index("## Features"))
    return text[start : text.index("\n\n", start)]


def test_docs_index_feature_table_equals_the_readme() -> None:
    """The site's front page shows the README's feature table (links made site-relative)."""
    readme = _features_table((ROOT / "README.md").read_text())
    index = _features_table((ROOT / "docs" / "index.md").read_text())
    assert index == readme.replace("](docs/", "](")
