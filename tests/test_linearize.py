"""transformer_zoo.linearize: attention transfer and fine-tuning on tiny models, in seconds."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from torch import nn

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    HedgehogFeatures,
    LearnedPositiveFeatures,
    NystromAttention,
    PerformerAttention,
    RotaryEmbedding,
    SoftmaxAttention,
    T2RFeatures,
)
from transformer_zoo.linearize import (
    AttentionTransfer,
    Finetune,
    Tap,
    convert,
    linearize,
    new_parameters,
)
from transformer_zoo.linearize.report import Bar

D, H, N = 32, 4, 24
# Nyström with its depthwise convolution: a kernel with parameters of its own (conv weights)
NYSTROM_CONV = functools.partial(NystromAttention, num_landmarks=4, conv_kernel=5)
PERFORMER = functools.partial(PerformerAttention, nb_features=16)
HEDGEHOG = functools.partial(PerformerAttention, feature_map=HedgehogFeatures())
LEARNED = {  # Performer with learnable feature maps (parameters in attention.feature_map)
    "hedgehog": HEDGEHOG,
    "t2r": functools.partial(PerformerAttention, nb_features=16, feature_map=T2RFeatures()),
    "learned_w": functools.partial(PerformerAttention, nb_features=16,
                                   feature_map=LearnedPositiveFeatures()),
}


def encoder(causal: bool = False, **overrides) -> Encoder:
    cfg = dict(d_model=D, n_heads=H, n_layers=2, dropout=0.0, causal=causal) | overrides
    return Encoder(EncoderConfig(**cfg)).eval()


def batches(count: int = 3, b: int = 4, n: int = N, pad: bool = True) -> list[dict]:
    out = []
    for _ in range(count):
        mask = torch.ones(b, n, dtype=torch.bool)
        if pad:
            mask[1, n // 2:] = False
        out.append({"x": torch.randn(b, n, D), "mask": mask})
    return out


def quiet(**kw):
    return dict(progress=False) | kw


# -- the teacher is the original model, exactly -----------------------------------------------
def test_teacher_mode_is_the_original_encoder():
    model = encoder(positional=lambda: RotaryEmbedding(head_dim=D // H))
    data = batches(1)[0]
    with torch.no_grad():
        ref = model(**data)
        conversion = convert(model, PERFORMER)
        with Tap(conversion, "teacher"):
            teacher = model(**data)
        student = model(**data)
    torch.testing.assert_close(teacher, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(student, ref, atol=1e-2)  # the approximation differs
    assert all("attend" not in vars(s) for s in conversion.students)  # tap removed


def test_teacher_mode_is_the_original_nn_multihead_model():
    layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x, pad = torch.randn(3, N, D), torch.zeros(3, N, dtype=torch.bool)
    pad[1, 10:] = True  # torch: True = padding
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=pad)
        conversion = convert(model, NYSTROM_CONV)
        assert conversion.kind == "nn.MultiheadAttention" and len(conversion.students) == 2
        with Tap(conversion, "teacher"):
            teacher = model(x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(teacher[keep], ref[keep], atol=1e-5, rtol=0)


# -- stage 1 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layerwise", [False, True], ids=["all_layers", "layerwise"])
def test_transfer_reduces_the_attention_error(layerwise):
    model = encoder()
    _, report = linearize(model, NYSTROM_CONV, batches(), **quiet(
        stage1=AttentionTransfer(steps=25, lr=3e-2, layerwise=layerwise)))
    before, after = report.attention_error["before"], report.attention_error["stage1"]
    assert report.stage1.skipped is None and report.stage1.steps == 25 * (2 if layerwise else 1)
    assert all(a < 0.5 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert report.hidden_error["stage1"] < report.hidden_error["before"]
    assert report.stage1.trained == ["layers.0.attention.conv.weight",
                                     "layers.1.attention.conv.weight"]
    assert report.stage2.skipped.startswith("not requested")
    assert "stage 1" in str(report) and "layers.1.attention" in str(report)


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_transfer_trains_learnable_feature_maps(name):
    model = encoder()
    _, report = linearize(model, LEARNED[name], batches(), **quiet(
        stage1=AttentionTransfer(steps=25, lr=3e-2)))
    before, after = report.attention_error["before"], report.attention_error["stage1"]
    assert all(a < 0.6 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert report.stage1.trained and all(".attention.feature_map." in n
                                         for n in report.stage1.trained)


def test_only_the_new_parameters_train_and_flags_are_restored():
    model = encoder()
    model.layers[0].norm1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linearize(model, NYSTROM_CONV, batches(), **quiet(stage1=AttentionTransfer(steps=3)))
    after = model.state_dict()
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert changed == set()  # every original tensor is untouched; the convs are new keys
    assert not model.training
    assert [p.requires_grad for p in model.layers[0].norm1.parameters()] == [False, True]
    assert all(p.requires_grad for p in model.layers[1].parameters())


def test_weights_cross_entropy_trains_too():
    model = encoder()
    _, report = linearize(model, NYSTROM_CONV, batches(), **quiet(
        stage1=AttentionTransfer(steps=15, lr=3e-2, weights_loss=0.5)))
    assert report.stage1.losses[-1] < report.stage1.losses[0]


def test_kernel_without_parameters_skips_stage1_and_gets_stage2():
    model = encoder()
    _, report = linearize(model, PERFORMER, batches(), **quiet(
        stage2=Finetune(steps=40, lr=3e-3)))
    assert "no parameters of its own" in report.stage1.skipped
    assert report.stage2.steps == 40 and report.stage2.stopped_by == "steps"
    assert report.hidden_error["stage2"] < 0.5 * report.hidden_error["before"]
    assert "stage1" not in report.attention_error
    assert set(report.stage2.trained) == {f"layers.{i}.attention.{p}_proj.{w}" for i in (0, 1)
                                          for p in ("q", "kv", "out") for w in ("weight", "bias")}


def test_stage2_target_is_the_original_model_not_the_drifting_one():
    """Loss at step 2 of a run = the hidden error after 1 step of an identical run, which is
    measured against outputs recorded before training: the teacher never drifts."""
    data = batches(1)
    runs = []
    for steps in (1, 2):
        torch.manual_seed(0)
        model = encoder()
        runs.append(linearize(model, PERFORMER, data, eval_batches=data, **quiet(
            stage1=None, stage2=Finetune(steps=steps, lr=3e-3)))[1])
    assert runs[1].stage2.losses[1] == pytest.approx(runs[0].hidden_error["stage2"], rel=1e-4)
    assert runs[1].stage2.losses[1] < runs[1].stage2.losses[0]


def test_trainable_patterns_and_predicates():
    model = encoder()
    _, report = linearize(model, PERFORMER, batches(), **quiet(
        stage2=Finetune(steps=1, trainable="layers.1.*")))
    assert report.stage2.trained and all(n.startswith("layers.1.") for n in report.stage2.trained)
    model = encoder()
    _, report = linearize(model, PERFORMER, batches(), **quiet(
        stage2=Finetune(steps=1, trainable=lambda name, p: name.endswith("out_proj.weight"))))
    assert report.stage2.trained == ["layers.0.attention.out_proj.weight",
                                     "layers.1.attention.out_proj.weight"]


# -- budgets, seeds, data ---------------------------------------------------------------------
def test_budgets_stop_each_stage():
    _, report = linearize(encoder(), NYSTROM_CONV, batches(), **quiet(
        stage1=AttentionTransfer(steps=1000, seconds=0.0), stage2=Finetune(steps=2)))
    assert report.stage1.stopped_by == "seconds" and report.stage1.steps == 0
    assert report.stage2.stopped_by == "steps" and report.stage2.steps == 2
    one_pass = iter(batches(2))
    _, report = linearize(encoder(), NYSTROM_CONV, one_pass, **quiet(
        stage1=AttentionTransfer(steps=10)))
    assert report.stage1.stopped_by == "data" and report.stage1.steps == 2
    _, report = linearize(encoder(), NYSTROM_CONV, batches(2), **quiet(
        stage1=AttentionTransfer(steps=5)))  # a list is re-iterated
    assert report.stage1.stopped_by == "steps" and report.stage1.steps == 5


def test_seeded_runs_are_reproducible_and_leave_the_global_generator_alone():
    def run(seed):
        torch.manual_seed(1)
        model = encoder()
        data = batches()
        state = torch.random.get_rng_state()
        _, report = linearize(model, PERFORMER, data, seed=seed, **quiet(
            stage2=Finetune(steps=3, lr=1e-3)))
        assert torch.equal(torch.random.get_rng_state(), state)
        return report, model.state_dict()

    (r1, s1), (r2, s2), (r3, _) = run(0), run(0), run(1)
    assert r1.stage2.losses == r2.stage2.losses
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1.attention_error["before"] != r3.attention_error["before"]  # other features


def test_progress_bar_draws_and_can_be_disabled():
    out = io.StringIO()
    bar = Bar("stage 1", 10, file=out)
    for i in range(1, 11):
        bar.update(i, "loss 0.1")
    bar.close("stopped by steps")
    text = out.getvalue()
    assert "stage 1 [" in text and "10/10" in text and "stopped by steps" in text
    silent = io.StringIO()
    bar = Bar("x", 3, enabled=False, file=silent)
    bar.update(3)
    bar.close("done")
    assert silent.getvalue() == ""


def test_monitor_records_a_curve():
    calls = []

    def monitor(model):
        calls.append(model.training)
        return 1.0

    _, report = linearize(encoder(), NYSTROM_CONV, batches(), monitor=monitor, monitor_every=2,
                          **quiet(stage1=AttentionTransfer(steps=4), stage2=Finetune(steps=2)))
    assert [(c["stage"], c["step"]) for c in report.curve] == [(1, 0), (1, 2), (1, 4), (2, 0),
                                                               (2, 2)]
    assert calls == [False] * 5


# -- errors -----------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    data = batches(1)
    with pytest.raises(TypeError, match="batches: expected an iterable"):
        linearize(encoder(), PERFORMER, data[0]["x"], progress=False)
    with pytest.raises(ValueError, match="batches: is empty"):
        linearize(encoder(), PERFORMER, [], progress=False)
    with pytest.raises(TypeError, match="stage1: expected AttentionTransfer"):
        linearize(encoder(), PERFORMER, data, stage1=Finetune(), progress=False)
    with pytest.raises(TypeError, match="stage2: expected Finetune"):
        linearize(encoder(), PERFORMER, data, stage2=AttentionTransfer(), progress=False)
    with pytest.raises(ValueError, match="steps: expected an int >= 0"):
        AttentionTransfer(steps=-1)
    with pytest.raises(ValueError, match="lr: expected a number > 0"):
        Finetune(lr=0)
    with pytest.raises(ValueError, match="seconds"):
        Finetune(seconds=-1.0)
    with pytest.raises(TypeError, match="trainable"):
        Finetune(trainable=3)
    with pytest.raises(ValueError, match="selects no parameter"):
        linearize(encoder(), PERFORMER, data, stage2=Finetune(trainable="nothing*"),
                  progress=False)
    with pytest.raises(ValueError, match="found no softmax attention"):
        linearize(nn.Sequential(nn.Linear(D, D)), PERFORMER, data, progress=False)
    with pytest.raises(TypeError, match="instance"):
        convert(encoder(), PerformerAttention(D, H))
    with pytest.raises(ValueError, match="expected one of"):
        convert(encoder(), "hedgehog_typo")
    with pytest.raises(TypeError, match="seed"):
        linearize(encoder(), PERFORMER, data, seed=1.5, progress=False)


def test_a_factory_sharing_one_module_across_layers_is_refused():
    shared = nn.Conv2d(H, H, (5, 1), padding=(2, 0), groups=H, bias=False)

    def factory(*args, **kwargs):
        attn = NYSTROM_CONV(*args, **kwargs)
        attn.conv = shared
        return attn

    with pytest.raises(ValueError, match="share the parameter"):
        convert(encoder(), factory)


def test_new_parameters_exclude_projections_and_positional():
    model = encoder(positional=lambda: RotaryEmbedding(head_dim=D // H))
    conversion = convert(model, NYSTROM_CONV)
    assert [n for n, _ in new_parameters(conversion.students[0])] == ["conv.weight"]
    assert convert(encoder(), SoftmaxAttention).new_parameters() == [[], []]


# -- save and reload --------------------------------------------------------------------------
def test_state_dict_round_trip_into_a_fresh_conversion():
    torch.manual_seed(0)
    model = encoder()
    fresh = encoder()
    fresh.load_state_dict(model.state_dict())
    linearize(model, NYSTROM_CONV, batches(), **quiet(stage1=AttentionTransfer(steps=5),
                                                       stage2=Finetune(steps=2)))
    convert(fresh, NYSTROM_CONV)
    fresh.load_state_dict(model.state_dict())
    data = batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data), model(**data), atol=0, rtol=0)


# -- Hugging Face and nn.MultiheadAttention models ------------------------------------------------
def test_hf_bert_transfer_and_save_pretrained_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    def bert():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                      intermediate_size=64, vocab_size=100,
                                      attn_implementation="sdpa")
        return transformers.BertModel(cfg).eval()

    model = bert()
    ids = torch.randint(1, 100, (4, N))
    mask = torch.ones(4, N, dtype=torch.long)
    mask[1, 15:] = 0
    data = [{"input_ids": ids, "attention_mask": mask}]
    with torch.no_grad():
        ref = model(**data[0]).last_hidden_state
        conversion = convert(model, NYSTROM_CONV)
        with Tap(conversion, "teacher"):
            teacher = model(**data[0]).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(teacher[real], ref[real], atol=1e-5, rtol=0)
    model = bert()
    _, report = linearize(model, NYSTROM_CONV, data, **quiet(
        stage1=AttentionTransfer(steps=20, lr=3e-2), stage2=Finetune(steps=5, lr=1e-3)))
    assert report.layers == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert all(a < b for a, b in zip(report.attention_error["stage1"],
                                     report.attention_error["before"], strict=True))
    assert report.hidden_error["stage2"] < report.hidden_error["before"]
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    convert(reloaded, NYSTROM_CONV)
    reloaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data[0]).last_hidden_state,
                                   model(**data[0]).last_hidden_state, atol=1e-6, rtol=0)


def test_nn_multihead_model_transfer_and_round_trip():
    def make():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    model, fresh = make(), make()
    data = [(torch.randn(3, N, D),) for _ in range(2)]
    _, report = linearize(model, NYSTROM_CONV, data, **quiet(
        stage1=AttentionTransfer(steps=20, lr=3e-2)))
    assert report.layers == ["layers.0.self_attn", "layers.1.self_attn"]
    assert report.stage1.trained == [f"layers.{i}.self_attn.attention.conv.weight" for i in (0, 1)]
    assert all(a < b for a, b in zip(report.attention_error["stage1"],
                                     report.attention_error["before"], strict=True))
    convert(fresh, NYSTROM_CONV)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(data[0][0]), model(data[0][0]), atol=0, rtol=0)


# -- causal models ----------------------------------------------------------------------------
def trained_causal_encoder(steps: int = 30) -> Encoder:
    """A causal encoder trained here for a few steps on a toy task (mean of the past inputs),
    so its attention is not the random initialisation."""
    torch.manual_seed(0)
    model = encoder(causal=True).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.randn(4, N, D)
        target = x.cumsum(1) / torch.arange(1, N + 1)[:, None]
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("attention", [PERFORMER, HEDGEHOG], ids=["favor", "hedgehog"])
def test_causal_conversion_keeps_causality_and_decode_equals_parallel(attention):
    model = trained_causal_encoder()
    data = [{"x": torch.randn(4, N, D)} for _ in range(2)]
    _, report = linearize(model, attention, data, **quiet(
        stage1=AttentionTransfer(steps=10, lr=3e-2), stage2=Finetune(steps=10, lr=1e-3)))
    assert report.hidden_error["stage2"] < report.hidden_error["before"]
    student = model.layers[0].attention
    assert isinstance(student, PerformerAttention) and student.causal
    x = torch.randn(2, N, D)
    with torch.no_grad():
        out = model(x)
        later = x.clone()
        later[:, 15:] = torch.randn(2, N - 15, D)  # change only the future of position 14
        torch.testing.assert_close(model(later)[:, :15], out[:, :15], atol=1e-6, rtol=0)
        assert not torch.allclose(model(later)[:, 15:], out[:, 15:])
        parallel, state, steps = student(x), None, []
        for t in range(N):
            y, state = student.step(x[:, t:t + 1], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), parallel, atol=1e-5, rtol=1e-5)


def test_causal_hf_llama_conversion_keeps_causality():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                   attn_implementation="sdpa")
    model = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, 100, (2, N))
    _, report = linearize(model, PERFORMER, [{"input_ids": ids}], **quiet(
        stage2=Finetune(steps=5, lr=1e-3)))
    assert report.stage2.steps == 5 and report.hidden_error["before"] > 0  # Performer ran
    later = ids.clone()
    later[:, 15:] = (later[:, 15:] + 1) % 100
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = model(input_ids=later).last_hidden_state
    torch.testing.assert_close(b[:, :15], a[:, :15], atol=1e-5, rtol=0)


# -- the MiniLM benchmark's helpers (the run itself: benchmarks/linearize_minilm.py) ------------
def test_benchmark_spearman_matches_scipy_and_texts_are_seeded():
    stats = pytest.importorskip("scipy.stats")
    from benchmarks.linearize_minilm import spearman
    from benchmarks.linearize_text import _prose, training_texts

    a, b = torch.randn(200, dtype=torch.float64), torch.randn(200, dtype=torch.float64)
    b = a + 0.5 * b
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0], abs=1e-12)
    paragraphs = [f"Paragraph {i} says something in plain words about the topic here." * 3
                  for i in range(20)]
    texts = training_texts(paragraphs, 30, seed=0)
    assert texts == training_texts(paragraphs, 30, seed=0) != training_texts(paragraphs, 30, 1)
    assert all(24 <= len(t.split()) <= 380 for t in texts)
    assert _prose(">>> x = 1\nprint(x)") is None and _prose("short one.") is None
    assert _prose("Return the sum of the values along the given axis, ignoring the masked "
                  "entries and any missing data.") is not None
