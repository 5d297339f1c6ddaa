"""ListOps data: a seeded generator, an evaluator, a vocabulary and train/valid/test splits.

ListOps (Nangia & Bowman 2018, arXiv 1804.06028) as used by the Long Range Arena (Tay et al.
2021, arXiv 2011.04006). An expression is a digit 0–9 or an operator applied to 2..max_args
sub-expressions, written in prefix form with a closing bracket::

    [MAX 2 9 [MIN 4 7 ] 0 ]   ->  9

Operators: ``[MAX`` and ``[MIN``; ``[MED`` the median, truncated to an integer like LRA's
``int(np.median(...))`` (the mean of the two middle values for an even count, floored); ``[SM``
the sum modulo 10. The label is the value (10 classes).

The generator follows LRA's ``generate_tree``: above ``max_depth`` a node is an operator with
probability ``op_p`` (LRA: 0.25) and a digit otherwise; at ``max_depth`` it is always a digit.
Whole expressions are drawn until their token count lies in ``[min_length, max_length]``;
duplicates are dropped, so the three splits are disjoint. Everything comes from one
``numpy.random.Generator(seed)``: same config + seed, same data.

LRA's sizes (100k expressions of 500–2000 tokens, ~14 ms each in Python) take about 25 minutes
on one core: ``make_splits_sharded`` draws them in independent streams ``(seed, shard)`` on
several processes; its data depends on (config, seed, shards), not on how many processes ran.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

OPERATORS: tuple[str, ...] = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
DIGITS: tuple[str, ...] = tuple(str(v) for v in range(10))
PAD = "<pad>"
#: Token strings in id order; id 0 is padding.
VOCAB: tuple[str, ...] = (PAD, *OPERATORS, CLOSE, *DIGITS)
TOKEN_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID = 0
N_CLASSES = 10


@dataclass(frozen=True)
class ListOpsConfig:
    """Sizes of the generated task.

    Attributes:
        min_length, max_length: accepted token counts (inclusive), brackets included.
        max_depth: deepest nesting; the root is depth 1 (LRA: 10).
        max_args: most arguments per operator; the fewest is 2 (LRA: 10).
        op_p: probability that a node above ``max_depth`` is an operator (LRA: 0.25).
        n_train, n_valid, n_test: split sizes (LRA: 96000, 2000, 2000).
    """

    min_length: int = 32
    max_length: int = 256
    max_depth: int = 6
    max_args: int = 5
    op_p: float = 0.25
    n_train: int = 20000
    n_valid: int = 1000
    n_test: int = 2000

    def __post_init__(self) -> None:
        for name in ("min_length", "max_length", "max_depth", "n_train", "n_valid", "n_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.max_args < 2:
            raise ValueError(f"max_args: expected >= 2, got {self.max_args}")
        if self.min_length > self.max_length:
            raise ValueError(
                f"min_length must be <= max_length, got {self.min_length} > {self.max_length}"
            )
        if not 0.0 < self.op_p < 1.0:
            raise ValueError(f"op_p: expected a probability in (0, 1), got {self.op_p}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


#: LRA's published ListOps settings (Tay et al. 2021, appendix): too slow to train on a CPU.
LRA_CONFIG = ListOpsConfig(
    min_length=500, max_length=2000, max_depth=10, max_args=10, n_train=96000, n_valid=2000,
    n_test=2000,
)


def generate_expression(
    rng: np.random.Generator,
    *,
    max_depth: int,
    max_args: int,
    op_p: float,
    depth: int = 1,
    root_is_operator: bool = False,
) -> list[str]:
    """One random expression as a token list (prefix form, ``]`` closes each operator).

    ``root_is_operator`` skips the draw at the root (only an operator can reach 2+ tokens, so
    with ``min_length >= 2`` this leaves the accepted distribution unchanged, and is faster).
    """
    if depth >= max_depth or (not root_is_operator and rng.random() >= op_p):
        return [DIGITS[int(rng.integers(10))]]
    tokens = [OPERATORS[int(rng.integers(len(OPERATORS)))]]
    for _ in range(int(rng.integers(2, max_args + 1))):
        tokens += generate_expression(
            rng, max_depth=max_depth, max_args=max_args, op_p=op_p, depth=depth + 1
        )
    tokens.append(CLOSE)
    return tokens


def apply_operator(op: str, args: Sequence[int]) -> int:
    """Value of one operator over its evaluated arguments."""
    if not args:
        raise ValueError(f"{op}: expected at least one argument, got none")
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        ordered = sorted(args)
        mid = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[mid]
        return (ordered[mid - 1] + ordered[mid]) // 2  # int(np.median) of non-negatives
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")


def evaluate(tokens: Sequence[str]) -> int:
    """Value of a tokenized expression, by one left-to-right pass over an explicit stack."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for i, tok in enumerate(tokens):
        if result is not None:
            raise ValueError(f"trailing token {tok!r} at {i} after a complete expression")
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == CLOSE:
            if not stack:
                raise ValueError(f"unbalanced ']' at {i}")
            op, args = stack.pop()
            value = apply_operator(op, args)
        elif tok in DIGITS:
            value = int(tok)
        else:
            raise ValueError(f"unknown token {tok!r} at {i}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if result is None:
        raise ValueError(f"incomplete expression: {len(stack)} operator(s) left open")
    return result


def tokenize(text: str) -> list[str]:
    """Split ``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` into tokens (whitespace-separated)."""
    return text.split()


def encode(tokens: Sequence[str]) -> list[int]:
    """Token strings -> ids in ``VOCAB``."""
    try:
        return [TOKEN_ID[t] for t in tokens]
    except KeyError as err:
        raise ValueError(f"unknown token {err.args[0]!r}; expected one of {VOCAB}") from None


@dataclass
class Split:
    """One split, padded: ``tokens (N, L)`` int64 (0 = pad), ``lengths (N,)``, ``labels (N,)``."""

    tokens: Tensor
    lengths: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _pack(expressions: list[list[str]]) -> Split:
    width = max(len(e) for e in expressions)
    tokens = torch.full((len(expressions), width), PAD_ID, dtype=torch.int64)
    for row, expr in enumerate(expressions):
        tokens[row, : len(expr)] = torch.tensor(encode(expr), dtype=torch.int64)
    lengths = torch.tensor([len(e) for e in expressions], dtype=torch.int64)
    labels = torch.tensor([evaluate(e) for e in expressions], dtype=torch.int64)
    return Split(tokens, lengths, labels)


def make_splits(config: ListOpsConfig, *, seed: int = 0) -> dict[str, Split]:
    """Generate ``{"train", "valid", "test"}``: disjoint, deterministic in ``(config, seed)``."""
    rng = np.random.default_rng(seed)
    total = config.n_train + config.n_valid + config.n_test
    seen: set[str] = set()
    expressions: list[list[str]] = []
    tries, max_tries = 0, 1000 * total
    while len(expressions) < total:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"could not draw {total} distinct expressions with lengths in "
                f"[{config.min_length}, {config.max_length}] after {max_tries} tries; "
                "widen the length range or raise max_depth / max_args"
            )
        expr = generate_expression(
            rng,
            max_depth=config.max_depth,
            max_args=config.max_args,
            op_p=config.op_p,
            root_is_operator=config.min_length >= 2,
        )
        if not config.min_length <= len(expr) <= config.max_length:
            continue
        key = " ".join(expr)
        if key in seen:
            continue
        seen.add(key)
        expressions.append(expr)
    a, b = config.n_train, config.n_train + config.n_valid
    return {
        "train": _pack(expressions[:a]),
        "valid": _pack(expressions[a:b]),
        "test": _pack(expressions[b:]),
    }


def _shard(config: ListOpsConfig, seed: int, shard: int, count: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` distinct expressions from the stream ``(seed, shard)``, encoded: the token ids
    of all of them end to end (uint8), their lengths and their labels."""
    rng = np.random.default_rng([seed, shard])
    seen: set[str] = set()
    ids: list[int] = []
    lengths, labels = [], []
    tries = 0
    while len(lengths) < count:
        tries += 1
        if tries > 1000 * count:
            raise ValueError(
                f"could not draw {count} distinct expressions with lengths in "
                f"[{config.min_length}, {config.max_length}] after {tries - 1} tries; "
                "widen the length range or raise max_depth / max_args"
            )
        expr = generate_expression(rng, max_depth=config.max_depth, max_args=config.max_args,
                                   op_p=config.op_p, root_is_operator=config.min_length >= 2)
        if not config.min_length <= len(expr) <= config.max_length:
            continue
        key = " ".join(expr)
        if key in seen:
            continue
        seen.add(key)
        ids += encode(expr)
        lengths.append(len(expr))
        labels.append(evaluate(expr))
    return (np.asarray(ids, dtype=np.uint8), np.asarray(lengths, dtype=np.int64),
            np.asarray(labels, dtype=np.int64))


def _pack_encoded(rows: list[np.ndarray], labels: list[int]) -> Split:
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    tokens = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
    tokens[np.arange(tokens.shape[1])[None, :] < lengths[:, None]] = np.concatenate(rows)
    return Split(torch.from_numpy(tokens), torch.from_numpy(lengths),
                 torch.as_tensor(labels, dtype=torch.int64))


def make_splits_sharded(config: ListOpsConfig, *, seed: int = 0, shards: int = 32,
                        workers: int = 1) -> dict[str, Split]:
    """``{"train", "valid", "test"}`` like ``make_splits``, drawn in ``shards`` independent
    streams (``numpy.random.default_rng([seed, shard])``), ``workers`` processes at a time.

    Each stream draws ⌈total / shards⌉ distinct expressions; they are joined in stream order,
    duplicates across streams dropped (first kept), and extra streams (shards, shards + 1, …)
    fill any gap, so the splits stay disjoint. Deterministic in (config, seed, shards); the
    number of workers changes only the wall time.
    """
    if shards < 1 or workers < 1:
        raise ValueError(f"shards and workers: expected >= 1, got {shards} and {workers}")
    total = config.n_train + config.n_valid + config.n_test
    per = -(-total // shards)
    calls = [(config, seed, i, per) for i in range(shards)]
    if workers == 1:
        parts = [_shard(*c) for c in calls]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, shards)) as pool:
            parts = pool.starmap(_shard, calls)
    rows: list[np.ndarray] = []
    labels: list[int] = []
    seen: set[bytes] = set()
    extra = shards
    while len(rows) < total:
        if not parts:
            parts = [_shard(config, seed, extra, per)]
            extra += 1
        flat, lengths, values = parts.pop(0)
        for row, label in zip(np.split(flat, np.cumsum(lengths)[:-1]), values, strict=True):
            key = row.tobytes()
            if key in seen or len(rows) == total:
                continue
            seen.add(key)
            rows.append(row)
            labels.append(int(label))
    a, b = config.n_train, config.n_train + config.n_valid
    return {"train": _pack_encoded(rows[:a], labels[:a]),
            "valid": _pack_encoded(rows[a:b], labels[a:b]),
            "test": _pack_encoded(rows[b:], labels[b:])}


def majority_baseline(train: Split, test: Split) -> tuple[int, float]:
    """The most frequent training label and its accuracy on ``test``."""
    label = int(torch.bincount(train.labels, minlength=N_CLASSES).argmax())
    return label, float((test.labels == label).float().mean())
