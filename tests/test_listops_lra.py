"""The LRA preset of ``benchmarks.listops`` (``--full``), on tiny overrides: the settings
follow the Nyströmformer paper's code, the test split is scored with the best-validation
checkpoint, the table puts the paper's numbers beside ours, the sharded data generator is
deterministic whatever the number of workers, and a time budget stops a run honestly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks.listops import train as train_module
from benchmarks.listops.config import TrainConfig, evaluations, make_schedule
from benchmarks.listops.data import (
    VOCAB,
    ListOpsConfig,
    evaluate,
    make_splits,
    make_splits_sharded,
)
from benchmarks.listops.model import LRA_MODEL, ListOpsClassifier, ModelConfig
from benchmarks.listops.presets import PRESETS
from benchmarks.listops.report import markdown_table, paper_accuracy
from benchmarks.listops.variants import Variant, build_variants
from transformer_zoo import LearnedPositionalEncoding, SoftmaxAttention
from transformer_zoo.functional import GeneralizedFeatures

pytestmark = pytest.mark.cpu_only  # a CPU training harness (data, checkpoints, tables)

TINY = ListOpsConfig(min_length=8, max_length=40, max_depth=4, max_args=4, n_train=64,
                     n_valid=24, n_test=24)


def test_full_preset_is_the_papers_setup():
    full = PRESETS["full"]
    d, m, t = full.data, full.model, full.train
    assert (d.min_length, d.max_length, d.max_depth, d.max_args) == (500, 2000, 10, 10)
    assert (d.n_train, d.n_valid, d.n_test) == (96000, 2000, 2000)
    assert (m.n_layers, m.d_model, m.n_heads, m.d_ff) == (2, 64, 2, 128)
    assert m.learned_positions and m.attention_dropout == 0.1 and m.max_len >= 2000
    assert (t.batch_size, t.steps, t.lr, t.warmup) == (32, 5000, 1e-4, 1000)
    assert t.schedule == "onecycle-linear" and t.eval_every == 50 and t.clip_norm is None
    assert t.weight_decay == 0.0 and t.adam_eps == 1e-6
    names = [v.name for v in build_variants(full=True)]
    assert names[::2] == ["softmax", "performer-relu-256", "nystrom-64"]
    performer = ListOpsClassifier(build_variants(full=True)[2].attention, LRA_MODEL)
    attn = performer.encoder.layers[0].attention
    assert isinstance(attn.feature_map, GeneralizedFeatures) and attn.nb_features == 256
    assert any(isinstance(mod, LearnedPositionalEncoding) for mod in performer.modules())
    plain = ListOpsClassifier(SoftmaxAttention, ModelConfig())  # the default: sinusoidal
    assert not any(isinstance(mod, LearnedPositionalEncoding) for mod in plain.modules())


def test_onecycle_schedule_warms_up_then_decays_linearly():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=20, schedule="onecycle-linear")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_schedule(opt, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 25)  # OneCycleLR's start, lr / div_factor
    assert max(lrs) == pytest.approx(1e-3, rel=1e-6) and lrs.index(max(lrs)) in (19, 20)
    rises, falls = torch.tensor(lrs[:20]).diff(), torch.tensor(lrs[21:]).diff()
    assert (rises > 0).all() and (falls < 0).all()
    assert falls.std() / falls.abs().mean() < 1e-3  # linear: equal decrements
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(steps=10, warmup=10, schedule="onecycle-linear")
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(steps=10, warmup=1, schedule="onecycle-linear")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential")


def test_evaluation_steps():
    assert evaluations(TrainConfig(steps=10)) == [10]
    assert evaluations(TrainConfig(steps=10, eval_every=3)) == [3, 6, 9, 10]
    assert evaluations(TrainConfig(steps=9, eval_every=3)) == [3, 6, 9]


def test_the_best_validation_checkpoint_is_the_one_tested(monkeypatch):
    """Scripted validation accuracies 0.2, 0.6, 0.4, 0.5: the test split must be scored with
    the parameters the model had at the second validation, not the last ones."""
    splits = make_splits(TINY, seed=2)
    scripted = iter([0.2, 0.6, 0.4, 0.5])
    fingerprints: list[tuple[str, float]] = []
    real = train_module.accuracy

    def fake_accuracy(model, split, **kwargs):
        weight = float(model.head.weight.detach().double().sum())
        if split is splits["valid"]:
            fingerprints.append(("valid", weight))
            for _ in range(train_module.eval_batches(split, kwargs["batch_size"])):
                kwargs["tick"]()
            return next(scripted)
        fingerprints.append(("test", weight))
        return real(model, split, **kwargs)

    monkeypatch.setattr(train_module, "accuracy", fake_accuracy)
    cfg = TrainConfig(steps=8, batch_size=8, warmup=2, eval_every=2, lr=1e-2)
    seen = []
    run = train_module.train_variant(Variant("softmax", SoftmaxAttention), splits,
                                     ModelConfig(), cfg,
                                     progress=lambda done, note: seen.append(done))
    kinds = [k for k, _ in fingerprints]
    assert kinds == ["valid"] * 4 + ["test"]
    valid_weights = [w for k, w in fingerprints if k == "valid"]
    assert len(set(valid_weights)) == 4  # the model moved between validations
    assert fingerprints[-1][1] == valid_weights[1]  # the test saw the step-4 state
    assert run["best_step"] == 4 and run["valid_accuracy"] == 0.6
    assert run["evaluated"] == "best validation checkpoint"
    assert [s for s, _ in run["validation_curve"]] == [2, 4, 6, 8]
    assert seen[-1] == train_module.run_units(splits, cfg)  # the bar reaches its total


def test_time_budget_stops_training_and_says_so():
    splits = make_splits(TINY, seed=2)
    cfg = TrainConfig(steps=50, batch_size=8, warmup=2, eval_every=10, time_budget_s=1e-9)
    seen = []
    run = train_module.train_variant(Variant("softmax", SoftmaxAttention), splits,
                                     ModelConfig(), cfg,
                                     progress=lambda done, note: seen.append(done))
    assert run["stopped_early"] and run["steps"] == 1 and run["best_step"] == 1
    assert seen[-1] == train_module.run_units(splits, cfg)


def test_full_table_shows_the_papers_numbers_beside_ours():
    def row(name, attention, alpha=0.0):
        return {"variant": name, "attention": attention, "rdrop_alpha": alpha,
                "test_accuracy": 0.25, "valid_accuracy": 0.3, "best_step": 4500,
                "final_task_loss": 1.5, "final_rdrop_kl": None, "steps_per_second": 10.0,
                "train_cpu_seconds": 1.0, "peak_memory_mb": 1.0}

    runs = [row("softmax", "SoftmaxAttention"), row("nystrom-64", "NystromAttention"),
            row("performer-relu-256", "PerformerAttention"),
            row("softmax+rdrop", "SoftmaxAttention", 1.0)]
    result = {"mode": "full", "runs": runs,
              "data": {"majority_baseline": {"label": 0, "test_accuracy": 0.1}}}
    header, _, *rows = markdown_table(result).splitlines()
    titles = [c.strip() for c in header.strip("|").split("|")]
    assert titles[:4] == ["variant", "test acc", "paper test acc", "tested step"]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[2] for c in cells[:4]] == ["0.3710", "0.3715", "0.1880", "-"]
    assert cells[0][3] == "4500"
    assert paper_accuracy(runs[3]) is None
    default = markdown_table(dict(result, mode="default"))
    assert "paper test acc" not in default  # not the paper's setup: no paper column


def test_cli_full_preset_with_tiny_overrides(tmp_path):
    """``--full`` end to end in this process, shrunk: the LRA model (learned positions), the
    best checkpoint tested, the paper column written, the overrides recorded."""
    from benchmarks.listops.__main__ import main

    result = main(["--full", "--steps", "6", "--eval-every", "2", "--examples", "48", "16",
                   "16", "--lengths", "10", "40", "--batch-size", "8", "--variants",
                   "softmax", "--no-isolate", "--quiet", "--no-cache", "--data-workers", "1",
                   "--out", str(tmp_path)])
    (run,) = result["runs"]
    assert result["mode"] == "full" and result["model"]["learned_positions"]
    assert run["evaluated"] == "best validation checkpoint" and run["best_step"] in (2, 4, 6)
    assert result["train"]["warmup"] == 2  # 1000 / 5000 of 6 steps, at least 2
    assert set(result["preset_overridden"]) >= {"steps", "examples", "lengths", "eval_every"}
    table = (tmp_path / "listops.md").read_text()
    assert "paper test acc" in table and "0.3710" in table and "preset overridden" in table
    assert "| performer" not in table  # --variants


def test_sharded_data_is_deterministic_disjoint_and_correct():
    one = make_splits_sharded(TINY, seed=4, shards=3, workers=1)
    assert {k: len(v) for k, v in one.items()} == {"train": 64, "valid": 24, "test": 24}
    again = make_splits_sharded(TINY, seed=4, shards=3, workers=1)
    other = make_splits_sharded(TINY, seed=5, shards=3, workers=1)
    rows = set()
    for name, split in one.items():
        for field in ("tokens", "lengths", "labels"):
            assert torch.equal(getattr(split, field), getattr(again[name], field))
        assert not torch.equal(split.tokens[:4], other[name].tokens[:4])
        for i in range(len(split)):
            n = int(split.lengths[i])
            tokens = [VOCAB[t] for t in split.tokens[i, :n].tolist()]
            assert TINY.min_length <= n <= TINY.max_length
            assert (split.tokens[i, n:] == 0).all()
            assert evaluate(tokens) == int(split.labels[i])
            rows.add(tuple(tokens))
    assert len(rows) == 112  # disjoint splits, no duplicate anywhere


@pytest.mark.slow
def test_sharded_data_does_not_depend_on_the_number_of_workers():
    one = make_splits_sharded(TINY, seed=4, shards=3, workers=1)
    two = make_splits_sharded(TINY, seed=4, shards=3, workers=2)
    for name in one:
        assert torch.equal(one[name].tokens, two[name].tokens)


def test_sharded_data_fills_a_gap_left_by_duplicates():
    """Streams that collide (a tiny space of expressions) still yield distinct splits of the
    asked sizes, from extra streams."""
    small = replace(TINY, min_length=4, max_length=6, max_depth=2, max_args=3, n_train=30,
                    n_valid=5, n_test=5)
    splits = make_splits_sharded(small, seed=0, shards=4)
    seen = {tuple(s.tokens[i, :int(s.lengths[i])].tolist()) for s in splits.values()
            for i in range(len(s))}
    assert len(seen) == 40
