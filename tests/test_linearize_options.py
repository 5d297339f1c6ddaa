"""linearize's options: learning-rate schedules, stage 2's pooled-cosine term and own batches."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from transformer_zoo import Encoder, EncoderConfig, PerformerAttention
from transformer_zoo.linearize import AttentionTransfer, Finetune, Tap, convert, linearize
from transformer_zoo.linearize.stages import lr_factor

D, H, N = 32, 4, 16
PERFORMER = functools.partial(PerformerAttention, nb_features=16)


def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(d_model=D, n_heads=H, n_layers=2, dropout=0.0)).eval()


def batches(count: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        mask = torch.ones(3, N, dtype=torch.bool)
        mask[1, N // 2:] = False
        out.append({"x": torch.randn(3, N, D, generator=g), "mask": mask})
    return out


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_factor_follows_its_formula(schedule):
    decay = {"constant": lambda t: 1.0, "linear": lambda t: 1.0 - t,
             "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t))}[schedule]
    for p in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert lr_factor(p, schedule, 0.0) == pytest.approx(decay(p))
    # warm-up: linear ramp over the first fifth, then the decay over the rest
    assert lr_factor(0.1, schedule, 0.2) == pytest.approx(0.5)
    assert lr_factor(0.2, schedule, 0.2) == pytest.approx(1.0)
    assert lr_factor(0.6, schedule, 0.2) == pytest.approx(decay(0.5))
    assert 0 < lr_factor(0.0, schedule, 0.2) <= 1e-3


def _first_steps(**options) -> list[float]:
    """Largest |change| of the trained weights at each of 2 stage-2 steps (AdamW's first
    steps move every weight by about lr · factor)."""
    model = encoder()
    moves = []
    seen = {}

    def monitor(m):
        now = {n: p.detach().clone() for n, p in m.named_parameters() if "q_proj" in n}
        if seen:
            moves.append(max(float((now[n] - seen[n]).abs().max()) for n in now))
        seen.update(now)

    linearize(model, PERFORMER, batches(), stage1=None, progress=False, monitor=monitor,
              monitor_every=1, stage2=Finetune(steps=2, lr=1e-2, trainable="*q_proj*",
                                               **options))
    return moves


def test_schedule_and_warmup_scale_the_steps():
    const = _first_steps()
    assert const[0] == pytest.approx(1e-2, rel=0.05) and const[1] == pytest.approx(1e-2, rel=0.3)
    linear = _first_steps(schedule="linear")  # progress 0, then 1/2
    assert linear[0] == pytest.approx(1e-2, rel=0.05) and linear[1] < 0.7 * const[1]
    warm = _first_steps(warmup=0.5)  # progress 0: factor 1e-3, then 1
    assert warm[0] < 2e-5 and warm[1] > 0.5e-2


def test_stage1_takes_a_schedule_too():
    from transformer_zoo import HedgehogFeatures

    hedgehog = functools.partial(PerformerAttention, feature_map=HedgehogFeatures())
    _, flat = linearize(encoder(), hedgehog, batches(), progress=False,
                        stage1=AttentionTransfer(steps=1, lr=1e-2, warmup=0.5))
    _, full = linearize(encoder(), hedgehog, batches(), progress=False,
                        stage1=AttentionTransfer(steps=1, lr=1e-2))
    before = torch.tensor(full.attention_error["before"])
    moved_warm = float((torch.tensor(flat.attention_error["stage1"]) - before).abs().sum())
    moved_full = float((torch.tensor(full.attention_error["stage1"]) - before).abs().sum())
    assert moved_warm < 1e-2 * moved_full


def test_pooled_cosine_adds_one_minus_the_mean_pooled_cosine():
    data = batches(1)
    losses = {}
    for w in (0.0, 2.0):
        _, report = linearize(encoder(), PERFORMER, data, stage1=None, progress=False,
                              stage2=Finetune(steps=1, pooled_cosine=w))
        losses[w] = report.stage2.losses[0]
    # by hand: the zero-shot converted model (linearize seeds the conversion with seed 0)
    model = encoder()
    torch.manual_seed(0)
    conversion = convert(model, PERFORMER)
    with torch.no_grad():
        with Tap(conversion, "teacher"):
            target = model(**data[0])
        pred = model(**data[0])
    real = data[0]["mask"][..., None].float()

    def pool(h):
        return (h * real).sum(1) / real.sum(1)

    expected = float((1 - F.cosine_similarity(pool(pred), pool(target), dim=-1)).mean())
    assert expected > 1e-4
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * expected, rel=1e-4)


def test_pooled_cosine_ignores_padding():
    """Changing what the padded positions hold changes neither the loss nor its pooled term."""
    data = batches(1)
    other = copy.deepcopy(data)
    other[0]["x"][1, N // 2:] = 100.0
    got = [linearize(encoder(), PERFORMER, d, stage1=None, progress=False,
                     stage2=Finetune(steps=1, pooled_cosine=1.0))[1].stage2.losses[0]
           for d in (data, other)]
    assert got[0] == pytest.approx(got[1], rel=1e-5)


def test_bad_schedule_options_raise_clear_errors():
    with pytest.raises(ValueError, match="schedule: expected one of"):
        Finetune(schedule="exponential")
    with pytest.raises(ValueError, match="warmup: expected a fraction"):
        AttentionTransfer(warmup=1.0)
    with pytest.raises(ValueError, match="warmup"):
        Finetune(warmup=-0.1)
    with pytest.raises(ValueError, match="pooled_cosine: expected a number >= 0"):
        Finetune(pooled_cosine=-1)


def test_stage2_batches_feed_stage2_only():
    from transformer_zoo import HedgehogFeatures

    hedgehog = functools.partial(PerformerAttention, feature_map=HedgehogFeatures())
    _, report = linearize(encoder(), hedgehog, batches(2), progress=False,
                          stage1=AttentionTransfer(steps=5), stage2=Finetune(steps=10),
                          stage2_batches=iter(batches(3)))  # one pass: 3 steps, then "data"
    assert report.stage1.steps == 5 and report.stage1.stopped_by == "steps"
    assert report.stage2.steps == 3 and report.stage2.stopped_by == "data"
    with pytest.raises(ValueError, match="stage2_batches: is empty"):
        linearize(encoder(), PERFORMER, batches(1), stage2=Finetune(steps=1),
                  stage2_batches=[], progress=False)
    with pytest.raises(TypeError, match="stage2_batches: expected an iterable"):
        linearize(encoder(), PERFORMER, batches(1), stage2_batches=batches(1)[0]["x"],
                  progress=False)


# -- the MiniLM benchmark's recipe (the run itself: benchmarks/linearize_minilm.py) ------------
class _WordTokenizer:
    """Whitespace 'tokenizer' with HF's call signature (ids = word lengths), for the helpers."""

    def __call__(self, texts, *, truncation=True, max_length=512, padding=False,
                 return_tensors=None):
        one = isinstance(texts, str)
        ids = [[len(w) for w in t.split()][:max_length] for t in ([texts] if one else texts)]
        if one:
            return {"input_ids": ids[0]}
        n = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


def test_benchmark_batches_cut_and_filter_by_tokens():
    from benchmarks.linearize_text import batches_by_length

    texts = [" ".join(["word"] * n) for n in (5, 10, 40, 80, 120, 200)]
    cut = batches_by_length(_WordTokenizer(), texts, 2, 0, max_length=64)
    assert sorted(int(b["attention_mask"].sum()) for b in cut) == [15, 104, 128]
    kept = batches_by_length(_WordTokenizer(), texts, 2, 0, min_length=40)
    assert sorted(int(b["attention_mask"].sum()) for b in kept) == [120, 320]


def test_benchmark_recipe_reaches_the_stages():
    from benchmarks.linearize_minilm import parse_args, variants

    args = parse_args(["--stage1-lr", "0.03", "--stage2-lr", "1e-4", "--schedule", "linear",
                       "--stage2-trainable", "all", "--pooled-cosine", "0.5"])
    table = variants(100.0, 200.0, args)
    hedgehog, nystrom = table["performer_hedgehog"], table["nystrom_64"]
    assert hedgehog["stage1"] == AttentionTransfer(steps=100_000, seconds=100.0, lr=0.03,
                                                   schedule="linear")
    assert hedgehog["stage2"] == Finetune(steps=100_000, seconds=200.0, lr=1e-4, trainable="*",
                                          schedule="linear", pooled_cosine=0.5)
    assert nystrom["stage2"].seconds == 300.0  # no parameters: stage 2 gets both budgets


def test_benchmark_hybrid_variant_and_merge():
    """The hybrid variant reads --window; --merge keeps the file's other rows only for the same
    data; the committed table is what the report renders from the committed JSON."""
    import json
    from pathlib import Path

    from benchmarks.linearize_minilm import merge_base, parse_args, variants
    from benchmarks.linearize_report import markdown

    table = variants(1.0, 2.0, parse_args(["--window", "32"]))
    assert table["hybrid_hedgehog"]["attention"].keywords["window"] == 32
    assert table["hybrid_hedgehog"]["stage2"].seconds == 2.0  # learnable: its own stage 1
    base = {"model": "m", "batch": 8, "train": {"texts": 800}, "held_out": {"short": 32},
            "results": []}
    assert merge_base(base, dict(base)) is base
    with pytest.raises(SystemExit, match="train"):
        merge_base(base, base | {"train": {"texts": 48}})
    results = Path(__file__).parents[1] / "benchmarks" / "results"
    committed = json.loads((results / "linearize_minilm.json").read_text())
    assert (results / "linearize_minilm.md").read_text() == markdown(committed)
    merged = [r for r in committed["results"] if r.get("run")]
    assert "hybrid_hedgehog" in [r["variant"] for r in merged]
    assert len(committed["results"]) == 5
    table_md = (results / "linearize_minilm.md").read_text()
    for row in merged:  # each merged row's own run is stated under the table
        assert f"- `{row['variant']}`: {row['run']['date']}" in table_md
