"""LoLCATs' sliding-window + linear hybrid attention: kernel vs a materialised reference, module.

The reference below forms the full (b, h, n, m) weights with the window mask, exactly as
LoLCATs' ``hybrid_attention_quadratic`` does (window max over the window's scores only, γ =
sigmoid(window factor)); the kernel must equal it in fp64, values and gradients.
"""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    HedgehogFeatures,
    HybridWindowAttention,
    PositiveFeatures,
    SoftmaxAttention,
    T2RFeatures,
)
from transformer_zoo.functional import hybrid_window_attention, softmax_attention
from transformer_zoo.functional.favor import log_features
from transformer_zoo.functional.hybrid_window_decode import HybridWindowState
from transformer_zoo.functional.random_features import draw_projection
from transformer_zoo.linearize import AttentionTransfer, convert, linearize

B, H, D = 2, 3, 8


def reference(q, k, v, lq, lk, window_factor, *, window, causal, exponential=True,
              affine=False, key_padding_mask=None):
    """The hybrid formula with the full n x m weights (slow, obvious)."""
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    i = torch.arange(n)[:, None] + (m - n)  # bottom-right aligned
    j = torch.arange(m)[None, :]
    inside = ((i - j >= 0) & (i - j < window)) if causal else ((i - j).abs() < window)
    outside = (j <= i - window) if causal else ((i - j).abs() >= window)
    if key_padding_mask is not None:
        inside = inside & key_padding_mask[:, None, None, :]
        outside = outside & key_padding_mask[:, None, None, :]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    s = s.masked_fill(~inside, float("-inf"))
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    gamma = torch.sigmoid(window_factor)[:, None, None]
    lam = 1 - gamma if affine else 1.0
    fq, fk = (lq.exp(), lk.exp()) if exponential else (lq, lk)
    lin = (fq @ fk.transpose(-2, -1)).masked_fill(~outside, 0.0)
    a = gamma * (s - top).exp() + lam * lin
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v) / torch.where(den > 0, den, 1.0), 0.0)


def built(fm, head_dim=D, heads=H, rows=16):
    w = draw_projection(rows, head_dim, seed=0, dtype=torch.float64)
    fm = fm.build(n_heads=heads, head_dim=head_dim, projection=w)
    return (fm.double() if isinstance(fm, torch.nn.Module) else fm), w


MAPS = {
    "hedgehog": lambda: HedgehogFeatures(feature_dim=6),
    "t2r": lambda: T2RFeatures(feature_dim=10),
}


def inputs(n, m, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(B, H, n, D, generator=g, dtype=torch.float64)).requires_grad_()
    k = (scale * torch.randn(B, H, m, D, generator=g, dtype=torch.float64)).requires_grad_()
    v = torch.randn(B, H, m, D, generator=g, dtype=torch.float64).requires_grad_()
    wf = torch.randn(H, generator=g, dtype=torch.float64).requires_grad_()
    return q, k, v, wf


def both(q, k, v, wf, fm, w, *, window, causal, mask=None, affine=False, chunk=4):
    out = hybrid_window_attention(q, k, v, w, wf, window=window, feature_map=fm, causal=causal,
                                  affine=affine, key_padding_mask=mask, chunk_size=chunk)
    lq, lk = log_features(q, k, w, feature_map=fm, key_padding_mask=mask, causal=causal)
    if not fm.exponential and mask is not None:
        lk = lk * mask[:, None, :, None]
    ref = reference(q, k, v, lq, lk, wf, window=window, causal=causal,
                    exponential=fm.exponential, affine=affine, key_padding_mask=mask)
    return out, ref


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 19), window=st.integers(1, 8), causal=st.booleans(),
       pad=st.booleans(), affine=st.booleans(), name=st.sampled_from(sorted(MAPS)),
       seed=st.integers(0, 2**16))
def test_kernel_equals_the_materialised_reference_fp64(n, window, causal, pad, affine, name,
                                                       seed):
    q, k, v, wf = inputs(n, n, seed)
    fm, w = built(MAPS[name]())
    mask = None
    if pad:
        mask = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) > 0.3
        mask[0] = False  # a sample without any key: its rows are 0
    out, ref = both(q, k, v, wf, fm, w, window=window, causal=causal, mask=mask, affine=affine)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    if pad:
        assert bool((out[0] == 0).all())
    # gradients: q, k, v, the window factor and the feature map's parameters
    params = [q, k, v, wf, *fm.parameters()]
    cot = torch.randn_like(out)
    got = torch.autograd.grad((out * cot).sum(), params, allow_unused=True,
                              materialize_grads=True)
    want = torch.autograd.grad((ref * cot).sum(), params, allow_unused=True,
                               materialize_grads=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n,m", [(5, 13), (13, 5), (1, 9)])
def test_cross_lengths_are_bottom_right_aligned(n, m, causal):
    q, k, v, wf = inputs(n, m, 1)
    fm, w = built(HedgehogFeatures())
    mask = torch.ones(B, m, dtype=torch.bool)
    mask[1, -2:] = False
    out, ref = both(q, k, v, wf, fm, w, window=3, causal=causal, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_random_feature_map_and_large_norms_are_exact():
    """Exponential features far from 1 (norm x 6): the kernel's stabilisers and the scale it
    multiplies back keep the formula exact, bidirectional and causal."""
    fm, w = built(PositiveFeatures())
    for causal in (False, True):
        q, k, v, wf = inputs(40, 40, 2, scale=6.0)
        out, ref = both(q, k, v, wf, fm, w, window=5, causal=causal, chunk=8)
        torch.testing.assert_close(out, ref, atol=1e-11, rtol=1e-9)


def test_window_covering_the_sequence_is_softmax_attention():
    q, k, v, wf = inputs(11, 11, 3)
    fm, w = built(HedgehogFeatures())
    mask = torch.ones(B, 11, dtype=torch.bool)
    mask[1, 7:] = False
    for causal in (False, True):
        exact = softmax_attention(q, k, v, mask=mask[:, None, None, :], causal=causal)
        for window in (11, 10**9):  # a huge window costs n x n, not w x w
            out = hybrid_window_attention(q, k, v, w, wf, window=window, feature_map=fm,
                                          causal=causal, key_padding_mask=mask)
            torch.testing.assert_close(out, exact, atol=1e-12, rtol=1e-10)
    # one key fewer in the window: the linear part is there and the result moves
    out = hybrid_window_attention(q, k, v, w, wf, window=10, feature_map=fm, causal=False)
    assert not torch.allclose(out, softmax_attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_every_parameter_is_in_the_graph_when_the_window_covers_the_input(causal):
    """window >= n: no linear keys, yet the map's parameters get (zero) gradients, so data
    parallel training sees every parameter used."""
    attn = HybridWindowAttention(32, 4, window=64, causal=causal)
    attn(torch.randn(2, 10, 32)).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None, name
    assert all(float(p.grad.abs().max()) == 0 for p in attn.feature_map.parameters())


def test_autocast_bf16_forms_fp32_features():
    torch.manual_seed(0)
    attn = HybridWindowAttention(32, 4, window=4)
    x = torch.randn(2, 24, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), attn(x), atol=5e-2, rtol=5e-2)


def test_grouped_query_heads_equal_repeated_keys():
    q, k, v, wf = inputs(9, 9, 4)
    k1, v1 = k[:, :1].detach(), v[:, :1].detach()
    fm, w = built(HedgehogFeatures())
    a = hybrid_window_attention(q, k1, v1, w, wf, window=3, feature_map=fm, causal=True)
    b = hybrid_window_attention(q, k1.expand(-1, H, -1, -1), v1.expand(-1, H, -1, -1), w, wf,
                                window=3, feature_map=fm, causal=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_module_is_causal():
    torch.manual_seed(0)
    attn = HybridWindowAttention(32, 4, window=5, causal=True).eval()
    with torch.no_grad():
        attn.window_factor.copy_(torch.randn(4))
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        out = attn(x)
        later = x.clone()
        later[:, 9:] += torch.randn(2, 8, 32)  # only the future of position 8 changes
        torch.testing.assert_close(attn(later)[:, :9], out[:, :9], atol=0, rtol=0)
        assert not torch.allclose(attn(later)[:, 9:], out[:, 9:])


DECODE_MAPS = {"hedgehog": HedgehogFeatures, "t2r": lambda: T2RFeatures(feature_dim=16),
               "favor": PositiveFeatures}


@pytest.mark.parametrize("name", sorted(DECODE_MAPS))
@pytest.mark.parametrize("window,prompt", [(1, 1), (5, 1), (5, 7), (16, 3)])
def test_decode_state_equals_the_parallel_form(name, window, prompt):
    torch.manual_seed(0)
    attn = HybridWindowAttention(32, 4, window=window, causal=True, nb_features=16,
                                 feature_map=DECODE_MAPS[name]()).double().eval()
    with torch.no_grad():
        attn.window_factor.copy_(torch.randn(4))
    n = 14
    x = torch.randn(2, n, 32, dtype=torch.float64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, [0, prompt, 9]] = False  # padded tokens in the prompt and later
    with torch.no_grad():
        parallel = attn(x, mask=mask)
        y, state = attn.forward_cached(x[:, :prompt], mask=mask[:, :prompt])
        ys = [y]
        for t in range(prompt, n):
            y, state = attn.forward_cached(x[:, t:t + 1], state, mask=mask[:, t:t + 1])
            ys.append(y)
            assert state.keys.shape[-2] <= window - 1  # the state does not grow
        y, _ = attn.forward_cached(x[:, prompt:], attn.forward_cached(
            x[:, :prompt], mask=mask[:, :prompt])[1], mask=mask[:, prompt:])  # a chunk
    assert isinstance(state, HybridWindowState) and state.length == n
    torch.testing.assert_close(torch.cat(ys, 1), parallel, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(y, parallel[:, prompt:], atol=1e-10, rtol=1e-9)


def test_state_dict_round_trip_and_parameters():
    torch.manual_seed(0)
    a = HybridWindowAttention(32, 4, window=4, init_window_factor=1.5)
    assert torch.allclose(a.window_weight, torch.sigmoid(torch.tensor(1.5)))
    with torch.no_grad():
        a.window_factor.add_(torch.randn(4))
        for p in a.feature_map.parameters():
            p.add_(0.1 * torch.randn_like(p))
    keys = set(a.state_dict())
    assert {"window_factor", "projection", "feature_map.query_weight"} <= keys
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = HybridWindowAttention(32, 4, window=4)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(HybridWindowAttention(32, 4, window=4)(x), a(x))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="window"):
        HybridWindowAttention(32, 4, window=0)
    with pytest.raises(TypeError, match="feature_map"):
        HybridWindowAttention(32, 4, feature_map="hedgehog")
    attn = HybridWindowAttention(32, 4, window=4)
    x = torch.randn(2, 6, 32)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, attn_mask=torch.ones(6, 6, dtype=torch.bool))
    q, k, v, wf = inputs(4, 4, 0)
    fm, w = built(HedgehogFeatures())
    with pytest.raises(ValueError, match="window_factor"):
        hybrid_window_attention(q, k, v, w, wf[:2], window=2, feature_map=fm)


def test_linearize_trains_feature_maps_and_window_factors():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(d_model=32, n_heads=4, n_layers=2, dropout=0.0)).eval()
    data = []
    for _ in range(3):
        mask = torch.ones(4, 24, dtype=torch.bool)
        mask[1, 12:] = False
        data.append({"x": torch.randn(4, 24, 32), "mask": mask})
    attention = functools.partial(HybridWindowAttention, window=4)
    _, report = linearize(model, attention, data, stage1=AttentionTransfer(steps=25, lr=3e-2),
                          progress=False)
    before, after = report.attention_error["before"], report.attention_error["stage1"]
    assert all(a < 0.6 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert "layers.0.attention.window_factor" in report.stage1.trained
    assert any(".attention.feature_map." in n for n in report.stage1.trained)
    student = model.layers[0].attention
    assert isinstance(student, HybridWindowAttention)
    assert not torch.equal(student.window_factor, torch.zeros(4))  # the factors trained


def test_nn_multihead_model_converts_to_the_hybrid():
    """nn.TransformerEncoder (through swap_attention): window >= n is the original model, and
    transfer trains the hybrid's own parameters."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 16, 32)
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[1, 11:] = True  # nn.MultiheadAttention's convention: True = padded
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=pad)
    wide = copy.deepcopy(model)
    convert(wide, functools.partial(HybridWindowAttention, window=16))
    with torch.no_grad():
        got = wide(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], ref[~pad], atol=1e-5, rtol=1e-5)
    _, report = linearize(model, functools.partial(HybridWindowAttention, window=3), [(x,)],
                          stage1=AttentionTransfer(steps=15, lr=3e-2), progress=False)
    assert "layers.1.self_attn.attention.window_factor" in report.stage1.trained
    assert all(a < b for a, b in zip(report.attention_error["stage1"],
                                     report.attention_error["before"], strict=True))


def test_hf_bert_runs_the_hybrid_through_the_bridge():
    transformers = pytest.importorskip("transformers")
    from transformer_zoo.interop import huggingface

    def bert():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      vocab_size=100, attn_implementation="sdpa")
        return transformers.BertModel(cfg).eval()

    model = bert()
    ids = torch.randint(1, 100, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 14:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        # a window covering every token: the hybrid is exactly softmax attention
        huggingface.use(model, functools.partial(HybridWindowAttention, window=20))
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    assert isinstance(model.encoder.layer[0].attention.self.tz_attention, HybridWindowAttention)
    # the named kernel, as linearize and swap_attention take it: the same, by name
    named = bert()
    huggingface.use(named, "hybrid_window", window=20)
    with torch.no_grad():
        by_name = named(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(by_name[real], ref[real], atol=1e-5, rtol=0)
    inner = named.encoder.layer[1].attention.self.tz_attention
    assert isinstance(inner, HybridWindowAttention) and inner.window == 20 and inner.layer == 1


def test_hf_llama_generates_on_the_hybrid_state():
    """A causal HF model (GQA, HF's rotary) with the hybrid: generate() on the state equals
    generate() without any cache, and the state does not grow."""
    transformers = pytest.importorskip("transformers")
    from transformer_zoo.interop import huggingface
    from transformer_zoo.interop.hf_cache import RecurrentLayer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, pad_token_id=0, eos_token_id=None,
                                   bos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    huggingface.use(model, functools.partial(HybridWindowAttention, window=4))
    ids = torch.randint(1, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    runs = [model.generate(ids, use_cache=cache, pad_token_id=0, do_sample=False,
                           max_new_tokens=10, output_logits=True, return_dict_in_generate=True)
            for cache in (True, False)]
    assert {type(layer) for layer in runs[0].past_key_values.layers} == {RecurrentLayer}
    state = runs[0].past_key_values.layers[0].state
    assert isinstance(state, HybridWindowState) and state.keys.shape[-2] == 3
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits),
                               rtol=1e-4, atol=1e-4)


def test_softmax_teacher_reads_the_same_heads():
    """The transfer's teacher (``SoftmaxAttention.attend`` on the student) runs on it."""
    attn = HybridWindowAttention(32, 4, window=50)
    x = torch.randn(2, 9, 32)
    q = attn.q_proj(x).view(2, 9, 4, 8).transpose(1, 2)
    k, v = attn.kv_proj(x).view(2, 9, 2, 4, 8).permute(2, 0, 3, 1, 4)
    pos = torch.arange(9)
    opts = dict(key_padding_mask=None, attn_mask=None, q_positions=pos, k_positions=pos)
    torch.testing.assert_close(SoftmaxAttention.attend(attn, q, k, v, **opts),
                               attn.attend(q, k, v, **opts), atol=1e-6, rtol=1e-5)
