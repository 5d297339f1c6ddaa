"""Hugging Face decoding on FAVOR+'s recurrent state (interop/hf_cache.py): generate() with the
state equals generate() without any cache (full recompute every token), token for token."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

from transformer_zoo import (  # noqa: E402
    HedgehogFeatures,
    LearnedPositiveFeatures,
    PerformerAttention,
    RotaryEmbedding,
    RotaryMode,
    SoftmaxAttention,
    T2RFeatures,
)
from transformer_zoo.functional.favor_decode import FavorState  # noqa: E402
from transformer_zoo.interop import huggingface as hf  # noqa: E402
from transformer_zoo.interop.hf_cache import (  # noqa: E402
    RecurrentCache,
    RecurrentLayer,
    cache_nbytes,
)
from transformer_zoo.interop.hf_kernels import ModuleKernel  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
VOCAB = 61


def llama(kernel="performer", **options) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=None,
                         bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    if kernel is not None:
        hf.use(model, kernel, **options)
    return model


def gpt2(rotary: RotaryMode | None) -> GPT2LMHeadModel:
    """A causal model without HF rotary; our Performer brings its own (both modes) or none."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        pad_token_id=0, eos_token_id=None, bos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    options = {} if rotary is None else dict(positional=RotaryEmbedding(head_dim=16),
                                             rotary=rotary)
    hf.use(model, functools.partial(PerformerAttention, nb_features=16, seed=1, **options))
    return model


def generate(model, ids, *, cache: bool, mask=None, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, use_cache=cache, pad_token_id=0,
                          do_sample=seed is not None, **kw)


def same_generation(model, ids, *, mask=None, seed=None, **kw) -> None:
    """With the state and without any cache: the same tokens and the same logits (to fp32
    rounding) at every step — the logits catch what a collapsed random model's tokens hide."""
    runs = [generate(model, ids, cache=cache, mask=mask, seed=seed, output_logits=True,
                     return_dict_in_generate=True, **kw) for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits),
                               rtol=1e-4, atol=1e-4)


def prompt(b=2, n=6, seed=0):
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "llama": lambda: llama(nb_features=16, seed=1),
    "gpt2-no-rotary": lambda: gpt2(None),
    "gpt2-rotary-query-key": lambda: gpt2(RotaryMode.QUERY_KEY),
    "gpt2-rotary-numerator": lambda: gpt2(RotaryMode.NUMERATOR),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_and_sampling_equal_full_recompute(name):
    """max_new_tokens well past the prompt (6 -> 6 + 30)."""
    model = MODELS[name]()
    ids = prompt()
    out = generate(model, ids, cache=True, max_new_tokens=30, return_dict_in_generate=True)
    assert {type(layer) for layer in out.cache.layers} == {RecurrentLayer}
    assert all(isinstance(layer.state, FavorState) for layer in out.cache.layers)
    same_generation(model, ids, max_new_tokens=30)
    same_generation(model, ids, seed=5, max_new_tokens=15)  # sampling


def test_state_size_does_not_grow_with_generated_tokens():
    model = llama(nb_features=16, seed=1)
    ids = prompt()
    sizes = [cache_nbytes(generate(model, ids, cache=True, max_new_tokens=n,
                                   return_dict_in_generate=True).cache) for n in (2, 30)]
    assert sizes[0] == sizes[1] > 0
    kv = llama(nb_features=16, seed=1, recurrent_cache=False)  # HF's KV cache, as before
    out = [generate(kv, ids, cache=True, max_new_tokens=n, return_dict_in_generate=True).cache
           for n in (2, 30)]
    assert {type(layer) for layer in out[1].layers} == {DynamicLayer}
    assert cache_nbytes(out[1]) > cache_nbytes(out[0])


@pytest.mark.parametrize("name", ["llama", "gpt2-rotary-numerator"])
def test_left_padded_batch_equals_single_sequences(name):
    model = MODELS[name]()
    ids = prompt(b=2, n=8, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    kw = dict(cache=True, max_new_tokens=20, output_logits=True, return_dict_in_generate=True)
    batch = generate(model, ids, mask=mask, **kw)
    for i, start in enumerate((3, 0)):
        alone = generate(model, ids[i:i + 1, start:], **kw)
        assert torch.equal(batch.sequences[i, 8:], alone.sequences[0, 8 - start:])
        torch.testing.assert_close(torch.stack(batch.logits)[:, i], torch.stack(alone.logits)[:, 0],
                                   rtol=1e-4, atol=1e-4)
    same_generation(model, ids, mask=mask, max_new_tokens=20)


def test_forward_with_use_cache_equals_full_forward():
    """prefill with use_cache=True, then tokens one at a time on out.cache (a plain forward,
    no generate): the logits equal the full forward's."""
    model = llama(nb_features=16, seed=1).double()
    ids = prompt(b=2, n=12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)
        assert isinstance(out.cache.layers[0], RecurrentLayer)
        logits, cache = [out.logits], out.cache
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
        assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


class HalfAndHalf(ModuleKernel):
    """A mixed model: softmax in layer 0 (HF's KV cache), Performer in layer 1 (the state)."""

    name = "test_half_and_half"

    def attention_factory(self, layer):
        return SoftmaxAttention if layer == 0 else functools.partial(
            PerformerAttention, nb_features=16, seed=1)


def test_mixed_kernels_per_layer():
    model = llama(HalfAndHalf())
    ids = prompt()
    out = generate(model, ids, cache=True, max_new_tokens=30, return_dict_in_generate=True)
    assert [type(layer) for layer in out.cache.layers] == [DynamicLayer, RecurrentLayer]
    same_generation(model, ids, max_new_tokens=30)


def test_explicit_cache_beam_search_and_going_back_to_sdpa():
    model = llama(nb_features=16, seed=1)
    ids = prompt()
    cache = RecurrentCache(model)
    assert [type(layer) for layer in cache.layers] == [RecurrentLayer] * 2
    out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, generate(model, ids, cache=False, max_new_tokens=12))
    beams = dict(num_beams=3, max_new_tokens=10)  # reorder_cache on the states
    assert torch.equal(generate(model, ids, cache=True, **beams),
                       generate(model, ids, cache=False, **beams))
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    model.set_attn_implementation("sdpa")  # HF's attention: its KV cache again
    out = generate(model, ids, cache=True, max_new_tokens=3, return_dict_in_generate=True)
    assert isinstance(out.cache, DynamicCache) and type(out.cache.layers[0]) is DynamicLayer


@pytest.mark.parametrize("make", [HedgehogFeatures, T2RFeatures, LearnedPositiveFeatures])
def test_learnable_feature_maps_decode_on_the_state(make):
    """Learnable maps (issue 15) through use(model, factory): the state, and generate() equal
    to the full recompute (T2R: plain ReLU features, no stabiliser)."""
    feature_map = make()
    model = llama(functools.partial(PerformerAttention, nb_features=16, seed=1,
                                    feature_map=feature_map))
    ids = prompt()
    out = generate(model, ids, cache=True, max_new_tokens=12, return_dict_in_generate=True)
    assert {type(layer) for layer in out.cache.layers} == {RecurrentLayer}
    same_generation(model, ids, max_new_tokens=12)


def test_generation_benchmark_runs_and_judges_targets(tmp_path):
    """benchmarks/generation.py on a tiny model and short lengths: every contender measured,
    the state's bytes constant, the KV caches' growing, the table and verdicts written."""
    from benchmarks import generation

    tiny = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                num_hidden_layers=1, intermediate_size=32, vocab_size=32)
    results = generation.measure(tokens=2, kv_performer_max=8, nb_features=8,
                                 windows=(4, 8, 16), model=tiny)
    runs = results["runs"]
    assert set(runs) == {generation.SDPA, generation.OURS, generation.OURS_KV}
    assert len(set(runs[generation.OURS]["cache_bytes"].values())) == 1
    sdpa = runs[generation.SDPA]["cache_bytes"]
    assert sdpa["16"] == 4 * sdpa["4"]  # keys and values of 16 vs 4 tokens
    assert "16" not in runs[generation.OURS_KV]["median_ms"]  # capped at kv_performer_max
    generation.report([results], tmp_path / "g.json")
    table = (tmp_path / "g.md").read_text()
    assert "state memory constant: met" in table and "| HF sdpa |" in table


def test_generation_targets_verdicts():
    from benchmarks.generation import OURS, SDPA, targets

    def run(ms, mem):
        return {"median_ms": dict(zip(("64", "2048", "8192"), ms, strict=True)),
                "cache_bytes": dict(zip(("64", "2048", "8192"), mem, strict=True))}

    met = {"windows": [64, 2048, 8192], "runs": {SDPA: run((1, 3, 9), (1, 32, 128)),
                                                 OURS: run((2, 2.2, 2.1), (5, 5, 5))}}
    assert [line.split(":")[1].split()[0] for line in targets(met)] == ["met"] * 3
    missed = {"windows": [64, 2048, 8192], "runs": {SDPA: run((1, 2, 9), (1, 32, 128)),
                                                    OURS: run((2, 3, 2), (5, 5, 6))}}
    assert [line.split(":")[1].split()[0] for line in targets(missed)] == ["MISSED"] * 3


def test_named_performer_kernel_with_a_learnable_map_decodes_on_the_state():
    model = llama("performer", nb_features=16, seed=1, feature_map=HedgehogFeatures())
    ids = prompt()
    out = generate(model, ids, cache=True, max_new_tokens=10, return_dict_in_generate=True)
    assert {type(layer) for layer in out.cache.layers} == {RecurrentLayer}
    same_generation(model, ids, max_new_tokens=10)
