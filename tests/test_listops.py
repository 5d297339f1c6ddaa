"""ListOps data (generator, evaluator, splits), the R-Drop loss, the classifier and --smoke."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.listops.data import (
    CLOSE,
    DIGITS,
    OPERATORS,
    PAD_ID,
    VOCAB,
    ListOpsConfig,
    encode,
    evaluate,
    generate_expression,
    majority_baseline,
    make_splits,
    tokenize,
)
from benchmarks.listops.model import ListOpsClassifier, ModelConfig
from benchmarks.listops.variants import build_variants, rdrop_loss
from transformer_zoo import SoftmaxAttention

pytestmark = pytest.mark.cpu_only  # a CPU training harness (worker processes, RSS)

ROOT = Path(__file__).resolve().parents[1]


# --- a slow, independent reference: recursive descent into a tree, numpy for the median ---


def _parse(tokens: list[str], i: int) -> tuple[object, int]:
    tok = tokens[i]
    if tok in DIGITS:
        return int(tok), i + 1
    assert tok in OPERATORS, tok
    children, i = [], i + 1
    while tokens[i] != CLOSE:
        child, i = _parse(tokens, i)
        children.append(child)
    return (tok, children), i + 1


def _value(tree: object) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [_value(c) for c in children]
    return {
        "[MAX": lambda v: int(np.max(v)),
        "[MIN": lambda v: int(np.min(v)),
        "[MED": lambda v: int(np.median(v)),  # what LRA does
        "[SM": lambda v: int(np.sum(v)) % 10,
    }[op](values)


def reference_evaluate(tokens: list[str]) -> int:
    tree, end = _parse(tokens, 0)
    assert end == len(tokens)
    return _value(tree)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("7", 7),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 4 7 ]", 4),
        ("[MED 1 9 4 ]", 4),
        ("[MED 1 2 ]", 1),  # median 1.5, truncated
        ("[MED 3 8 9 1 ]", 5),  # sorted 1 3 8 9: median 5.5 -> 5
        ("[SM 9 8 7 ]", 4),  # 24 mod 10
        ("[SM [MAX 5 6 ] [MIN 9 8 ] ]", 4),  # 6 + 8 = 14
        ("[MIN [SM 5 5 ] [MED 9 9 9 ] 3 ]", 0),  # min(0, 9, 3)
        ("[MAX [MED [SM 1 2 ] [MIN 7 8 ] 0 ] 2 ]", 3),  # med(3, 7, 0) = 3
    ],
)
def test_evaluate_hand_checked(text: str, value: int) -> None:
    assert evaluate(tokenize(text)) == value
    assert reference_evaluate(tokenize(text)) == value


@given(st.integers(0, 2**32 - 1), st.integers(1, 7), st.integers(2, 6))
def test_evaluate_matches_reference_on_generated(seed: int, depth: int, args: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(5):
        tokens = generate_expression(rng, max_depth=depth, max_args=args, op_p=0.4)
        assert evaluate(tokens) == reference_evaluate(tokens)


@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(2, 6))
def test_generator_respects_depth_and_arguments(seed: int, depth: int, args: int) -> None:
    tokens = generate_expression(
        np.random.default_rng(seed), max_depth=depth, max_args=args, op_p=0.5,
        root_is_operator=depth > 1,
    )
    open_ops: list[int] = [0]  # argument counts of the open operators (0 = the root slot)
    deepest = 0
    for tok in tokens:
        if tok in OPERATORS:
            open_ops[-1] += 1
            open_ops.append(0)
            deepest = max(deepest, len(open_ops) - 1)
        elif tok == CLOSE:
            assert 2 <= open_ops.pop() <= args
        else:
            open_ops[-1] += 1
    assert open_ops == [1]
    assert deepest <= depth - 1  # digits fill depth ``depth``; operators stop above it
    if depth > 1:
        assert tokens[0] in OPERATORS


@pytest.mark.parametrize(
    "bad", ["[MAX 1 ]]", "[MAX 1 2", "1 2", "[FOO 1 2 ]", "[MAX ]", "]"]
)
def test_evaluate_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        evaluate(tokenize(bad))


SMALL = ListOpsConfig(
    min_length=6, max_length=40, max_depth=4, max_args=4, n_train=300, n_valid=50, n_test=80
)


def test_splits_are_deterministic_disjoint_and_labelled() -> None:
    a, b = make_splits(SMALL, seed=3), make_splits(SMALL, seed=3)
    other = make_splits(SMALL, seed=4)
    assert not torch.equal(a["train"].tokens, other["train"].tokens)
    texts = {}
    for name in ("train", "valid", "test"):
        assert torch.equal(a[name].tokens, b[name].tokens)
        assert torch.equal(a[name].labels, b[name].labels)
        split = a[name]
        assert len(split) == getattr(SMALL, f"n_{name}")
        assert split.tokens.dtype == torch.int64
        assert split.lengths.min() >= SMALL.min_length
        assert split.lengths.max() <= SMALL.max_length
        rows = []
        for row, n, label in zip(split.tokens, split.lengths, split.labels, strict=True):
            assert (row[n:] == PAD_ID).all() and (row[:n] != PAD_ID).all()
            tokens = [VOCAB[int(t)] for t in row[:n]]
            assert reference_evaluate(tokens) == int(label)
            rows.append(" ".join(tokens))
        assert len(set(rows)) == len(rows)
        texts[name] = set(rows)
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["valid"]
    assert not texts["valid"] & texts["test"]


def test_majority_baseline_and_vocab() -> None:
    splits = make_splits(SMALL, seed=0)
    label, acc = majority_baseline(splits["train"], splits["test"])
    counts = torch.bincount(splits["train"].labels, minlength=10)
    assert counts[label] == counts.max()
    assert acc == pytest.approx(float((splits["test"].labels == label).float().mean()))
    assert VOCAB[PAD_ID] == "<pad>" and len(set(VOCAB)) == len(VOCAB) == 16
    assert encode(tokenize("[SM 1 ]")) == [VOCAB.index("[SM"), VOCAB.index("1"), VOCAB.index("]")]
    with pytest.raises(ValueError, match="unknown token"):
        encode(["[FOO"])


@pytest.mark.parametrize(
    "kwargs",
    [{"min_length": 0}, {"max_args": 1}, {"min_length": 50, "max_length": 10}, {"op_p": 1.0}],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ListOpsConfig(**kwargs)


def test_rdrop_loss_is_ce_twice_plus_alpha_symmetric_kl() -> None:
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    pa, pb = a.softmax(-1), b.softmax(-1)
    slow = 0.5 * ((pa * (pa / pb).log()).sum(-1) + (pb * (pb / pa).log()).sum(-1)).mean()
    y = torch.randint(0, 10, (6,))
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(rdrop_loss(2.0)(a, b, y), ce(a, y) + ce(b, y) + 2.0 * slow)


def test_rdrop_parts_are_the_mean_task_loss_and_the_unweighted_kl() -> None:
    from benchmarks.listops.variants import rdrop_parts

    a, b = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    task, kl = rdrop_parts(a, b, y)
    ce = torch.nn.functional.cross_entropy
    assert task == pytest.approx(float(ce(a, y) + ce(b, y)) / 2)
    for alpha in (0.5, 1.0, 3.0):
        assert float(rdrop_loss(alpha)(a, b, y)) == pytest.approx(2 * task + alpha * kl)
    assert rdrop_parts(a, a, y)[1] == pytest.approx(0.0, abs=1e-7)


def test_training_reports_task_loss_and_rdrop_kl_apart() -> None:
    """An R-Drop run's task loss is its mean CE (comparable with a plain run), not the whole
    objective; the KL term is reported beside it, labelled, and the table shows both."""
    from benchmarks.listops.report import loss_note, markdown_table
    from benchmarks.listops.train import TrainConfig, run_units, train_variant

    splits = make_splits(SMALL, seed=1)
    cfg = TrainConfig(steps=10, batch_size=8, warmup=2)
    plain, rdrop = build_variants(rdrop_alpha=0.5)[:2]
    seen: list[tuple[int, str]] = []
    runs = [train_variant(plain, splits, ModelConfig(), cfg),
            train_variant(rdrop, splits, ModelConfig(), cfg,
                          progress=lambda done, note: seen.append((done, note)))]
    assert runs[0]["final_rdrop_kl"] is None
    assert runs[0]["final_objective"] == pytest.approx(runs[0]["final_task_loss"])
    task, kl = runs[1]["final_task_loss"], runs[1]["final_rdrop_kl"]
    assert kl > 0
    assert runs[1]["final_objective"] == pytest.approx(2 * task + 0.5 * kl)
    assert 1.0 < task < 3.5  # a 10-class cross-entropy, not two of them plus the KL
    assert seen[-1][0] == run_units(splits, cfg)  # the progress reports reach the total
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    result = {"runs": runs, "data": {"majority_baseline": {"label": 0, "test_accuracy": 0.1}}}
    header, _, row_plain, row_rdrop, _ = markdown_table(result).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "task loss (CE)" in columns and "R-Drop KL" in columns
    assert "train loss" not in columns
    i, j = columns.index("task loss (CE)"), columns.index("R-Drop KL")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in (row_plain, row_rdrop)]
    assert cells[0][i] == f"{runs[0]['final_task_loss']:.3f}" and cells[0][j] == "-"
    assert cells[1][i] == f"{task:.3f}" and cells[1][j] == f"{kl:.3f}"
    assert "α = 0.5" in loss_note(result) and "unweighted" in loss_note(result)


def test_table_renders_results_written_before_the_loss_split() -> None:
    old = {"variant": "softmax", "test_accuracy": 0.3, "valid_accuracy": 0.3,
           "final_train_loss": 2.0, "steps_per_second": 1.0, "train_cpu_seconds": 1.0,
           "peak_memory_mb": 1.0, "rdrop_alpha": 0.0}
    from benchmarks.listops.report import markdown_table

    result = {"runs": [old, dict(old, variant="softmax+rdrop", rdrop_alpha=1.0,
                                 final_train_loss=4.2)],
              "data": {"majority_baseline": {"label": 0, "test_accuracy": 0.1}}}
    _, _, plain, rdrop, _ = markdown_table(result).splitlines()
    assert "| 2.000 | - |" in plain  # the same number: a plain run's loss is its CE
    assert "| - | - |" in rdrop and "4.2" not in rdrop  # the whole objective is not shown


def test_classifier_ignores_padding() -> None:
    model = ListOpsClassifier(SoftmaxAttention, ModelConfig()).eval()
    tokens = torch.tensor([encode(tokenize("[MAX 2 9 [MIN 4 7 ] 0 ]"))])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    padded = torch.cat([tokens, torch.zeros(1, 5, dtype=torch.int64)], dim=1)
    padded_mask = padded != PAD_ID
    torch.testing.assert_close(model(tokens, mask), model(padded, padded_mask))
    assert model(tokens, mask).shape == (1, 10)


def test_variants_are_objects_with_and_without_rdrop() -> None:
    variants = build_variants(rdrop_alpha=0.5)
    assert variants[0].attention is SoftmaxAttention and variants[0].rdrop_alpha == 0
    assert variants[1].attention is SoftmaxAttention and variants[1].rdrop_alpha == 0.5
    assert len(variants) % 2 == 0 and all(callable(v.attention) for v in variants)


def render_terminal(text: str) -> list[str]:
    """The screen a terminal shows after ``text``: ``\\r``, ``\\n`` and cursor-up (``ESC[nA``)
    move the cursor, other characters overwrite the cell under it. Enough for tqdm's output."""
    screen: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[(\d*)A|(\r)|(\n)|([^\r\n\x1b])", text):
        up, cr, lf, char = token
        if cr:
            col = 0
        elif lf:
            row, col = row + 1, 0
        elif char:
            line = screen[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
        else:
            row = max(0, row - int(up or 1))
        while len(screen) <= row:
            screen.append([])
    return ["".join(line).rstrip() for line in screen]


def test_terminal_renderer() -> None:
    assert render_terminal("ab\rc\nxy\x1b[Az\n\n") == ["cbz", "xy", ""]


def test_run_bars_draw_one_line_per_run_and_close_before_the_table(monkeypatch) -> None:
    import io

    from benchmarks.listops.progress import RunBars

    stream = io.StringIO()
    names = ["softmax", "softmax+rdrop", "nystrom-16"]
    with RunBars(names, [5, 5, 5], file=stream) as bars:
        report = [bars.reporter(i) for i in range(3)]
        report[1](0, "training")
        report[2](0, "training")
        for done in range(1, 6):  # run 2 finishes first, then 1, then 0 starts and finishes
            report[2](done, "loss=2.1")
        report[2](5, "test acc 0.300")
        for done in range(1, 6):
            report[1](done, "")
        report[0](0, "training")
        report[0](3, "")
        report[0](3, "")  # a repeated report changes nothing
        report[0](5, "test acc 0.250")
        clock = bars.bars[2].format_dict["elapsed"]
        monkeypatch.setattr(bars.bars[2], "_time", lambda: 1e12)  # tqdm's clock, much later
        assert bars.bars[2].format_dict["elapsed"] == clock  # a finished run's clock stopped
        monkeypatch.undo()
    stream.write("| table |\n|---|\n")
    screen = [line for line in render_terminal(stream.getvalue()) if line]
    assert len(screen) == 5, screen
    for name, line in zip(names, screen, strict=False):
        assert line.startswith(name.ljust(13) + ":") and "100%" in line and "5/5" in line
    assert "test acc 0.250" in screen[0] and "test acc 0.300" in screen[2]
    assert screen[3:] == ["| table |", "|---|"]

    quiet = io.StringIO()
    with RunBars(names, [5, 5, 5], enabled=False, file=quiet) as bars:
        bars.update(0, 5, "done")
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_smoke_run_writes_results(tmp_path: Path) -> None:
    """The whole job in its worker processes: results written, and what a terminal shows is
    the header, one finished bar per run and then the table, intact (all on one stream)."""
    import os

    from benchmarks.listops.report import loss_note, markdown_table

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.listops", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # bars (stderr) and table (stdout) in the order written
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = proc.stdout.decode()  # not text=True: universal newlines would turn \r into \n
    assert proc.returncode == 0, output[-3000:]
    result = json.loads((tmp_path / "listops.json").read_text())
    assert (tmp_path / "listops.png").stat().st_size > 0
    table = (tmp_path / "listops.md").read_text()
    names = [run["variant"] for run in result["runs"]]
    assert names[:2] == ["softmax", "softmax+rdrop"]
    for run in result["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["steps_per_second"] > 0
        assert run["variant"] in table
    assert "majority class" in table

    screen = [line for line in render_terminal(output) if line]
    assert screen[0].startswith("ListOps smoke:")
    bars = screen[1 : 1 + len(names)]
    for name, line in zip(names, bars, strict=True):  # one line per run, in order, finished
        assert line.split(":")[0].strip() == name and "100%" in line and "test acc" in line
    rows = markdown_table(result).splitlines()
    assert screen[1 + len(names) : 1 + len(names) + len(rows)] == rows  # the table, intact
    assert screen[1 + len(names) + len(rows)] == loss_note(result)  # what the losses are
    assert len(screen) == 3 + len(names) + len(rows)  # and then only the closing line


def test_variants_cover_every_attention_with_and_without_rdrop() -> None:
    from transformer_zoo import NystromAttention, PerformerAttention

    names = [v.name for v in build_variants()]
    assert names == [
        "softmax", "softmax+rdrop", "performer-64", "performer-64+rdrop",
        "nystrom-16", "nystrom-16+rdrop",
    ]
    assert [v.rdrop_alpha > 0 for v in build_variants()] == [False, True] * 3
    full = build_variants(full=True)
    performer = ListOpsClassifier(full[2].attention, ModelConfig()).encoder.layers[0].attention
    nystrom = ListOpsClassifier(full[4].attention, ModelConfig()).encoder.layers[0].attention
    assert isinstance(performer, PerformerAttention) and performer.nb_features == 256
    assert isinstance(nystrom, NystromAttention) and nystrom.num_landmarks == 64


def test_data_cache_round_trips(tmp_path: Path) -> None:
    from benchmarks.listops.__main__ import load_or_make_splits

    fresh = make_splits(SMALL, seed=5)
    first = load_or_make_splits(SMALL, 5, tmp_path)
    again = load_or_make_splits(SMALL, 5, tmp_path)
    assert len(list(tmp_path.glob("listops-data-*.pt"))) == 1
    load_or_make_splits(SMALL, 6, tmp_path)  # another seed, another file
    assert len(list(tmp_path.glob("listops-data-*.pt"))) == 2
    for name in fresh:
        for field in ("tokens", "lengths", "labels"):
            assert torch.equal(getattr(first[name], field), getattr(fresh[name], field))
            assert torch.equal(getattr(again[name], field), getattr(fresh[name], field))


def test_bucketed_batches_cover_each_epoch_with_similar_lengths() -> None:
    from benchmarks.listops.train import bucketed_batches

    lengths = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0))
    batches = bucketed_batches(lengths, 10, torch.Generator().manual_seed(1), pool=5)
    epoch = [next(batches) for _ in range(100)]
    assert all(b.shape == (10,) for b in epoch)
    assert sorted(torch.cat(epoch).tolist()) == list(range(1000))
    spread = torch.stack([lengths[b].max() - lengths[b].min() for b in epoch]).float().mean()
    random_spread = torch.stack(
        [lengths[b].max() - lengths[b].min() for b in torch.randperm(1000).split(10)]
    ).float().mean()
    assert spread < random_spread / 3
    again = bucketed_batches(lengths, 10, torch.Generator().manual_seed(1), pool=5)
    assert all(torch.equal(next(again), b) for b in epoch)
