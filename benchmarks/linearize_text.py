"""Text for ``benchmarks.linearize_minilm``: training prose from installed packages' docstrings,
held-out prose from Python's reference manual (two disjoint offline sources), batched by length.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
import re
import warnings

TRAIN_PACKAGES = ("numpy", "scipy", "sympy", "networkx", "sklearn", "matplotlib", "torch")


def _prose(paragraph: str) -> str | None:
    lines = paragraph.splitlines()
    if not lines or any(ln.startswith((" ", "\t", ">>>", "..", "*", "-", "=", "|", "#"))
                        for ln in lines):
        return None
    text = " ".join(ln.strip() for ln in lines)
    words = text.split()
    letters = sum(c.isalpha() or c.isspace() for c in text) / max(len(text), 1)
    if len(words) < 12 or letters < 0.9 or not text[0].isupper() or text.count("`") > 4:
        return None
    return text


def docstring_paragraphs(packages: tuple[str, ...] = TRAIN_PACKAGES) -> list[str]:
    """Distinct prose paragraphs of the packages' public modules, functions, classes, methods."""
    seen: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in packages:
            try:
                package = importlib.import_module(name)
            except ImportError:
                continue
            modules = [package] + [getattr(package, a) for a in sorted(dir(package))
                                   if inspect.ismodule(getattr(package, a, None))]
            for module in modules:
                members = [module] + [getattr(module, a, None) for a in sorted(dir(module))
                                      if not a.startswith("_")]
                for obj in members:
                    objs = [obj] + ([v for k, v in sorted(vars(obj).items())
                                     if not k.startswith("_")] if inspect.isclass(obj) else [])
                    for o in objs:
                        doc = inspect.getdoc(o) if callable(o) or inspect.ismodule(o) else None
                        for para in re.split(r"\n\s*\n", doc or ""):
                            text = _prose(para)
                            if text:
                                seen.setdefault(text)
    return list(seen)


def training_texts(paragraphs: list[str], count: int, seed: int) -> list[str]:
    """``count`` texts of 24-380 words (log-uniform: most are short, some fill 512 tokens):
    consecutive paragraphs from a random start."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        target = int(math.exp(rng.uniform(math.log(24), math.log(380))))
        i = rng.randrange(len(paragraphs))
        words: list[str] = []
        while len(words) < target:
            words += paragraphs[i % len(paragraphs)].split()
            i += 1
        texts.append(" ".join(words[:target]))
    return texts


def held_out_texts() -> tuple[list[str], list[str]]:
    """(short passages, long passages) of Python's reference manual."""
    from benchmarks.interop_zero_shot import prose_passages

    sets = prose_passages()
    short = [text for _, text in sets["selection"] + sets["held_out"]]
    long = [" ".join(short[i:i + 3]) for i in range(0, len(short) - 2, 5)]
    return short, long


def batches_by_length(tok, texts: list[str], batch: int, seed: int, *, max_length: int = 512,
                      min_length: int = 0) -> list[dict]:
    """Batches of ``batch`` texts of similar length (shuffled), each text truncated to
    ``max_length`` tokens; texts shorter than ``min_length`` tokens (before truncation) left out."""
    lengths = [len(tok(t, truncation=True, max_length=512)["input_ids"]) for t in texts]
    order = sorted((i for i in range(len(texts)) if lengths[i] >= min_length),
                   key=lengths.__getitem__)
    groups = [order[i:i + batch] for i in range(0, len(order), batch)]
    random.Random(seed).shuffle(groups)
    return [dict(tok([texts[i] for i in g], padding=True, truncation=True,
                     max_length=max_length, return_tensors="pt")) for g in groups]
