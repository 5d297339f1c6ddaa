"""Learnable feature maps (Hedgehog, T2R, learned-W FAVOR+) through the FAVOR+ kernel.

Oracles: the maps' formulas written here in fp64 (softmax, ReLU, exp), a quadratic-form
linear attention D⁻¹(φ(Q)φ(K)ᵀ ⊙ M)V next to the tests, and PerformerAttention with its
random features (learned-W FAVOR+ at init).
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    HedgehogFeatures,
    LearnedPositiveFeatures,
    PerformerAttention,
    RotaryEmbedding,
    RotaryMode,
    T2RFeatures,
)
from transformer_zoo.functional import draw_projection, favor_attention
from transformer_zoo.functional.favor_decode import favor_decode_step

F64 = torch.float64
H, D = 2, 8
SPECS = {
    "hedgehog": lambda: HedgehogFeatures(),
    "hedgehog-shared": lambda: HedgehogFeatures(shared_qk=True, feature_dim=6),
    "t2r": lambda: T2RFeatures(),
    "learned-favor": lambda: LearnedPositiveFeatures(),
}


def built(name: str, *, seed: int = 0, dtype=F64, perturb: bool = True):
    """A built map (n_heads=H, head_dim=D, r = 12) in ``dtype``; ``perturb`` moves every
    parameter off its init (identity/zeros are special points for a gradient check)."""
    torch.manual_seed(seed)
    fm = SPECS[name]().build(n_heads=H, head_dim=D, projection=draw_projection(12, D, seed=seed))
    fm = fm.to(dtype)
    if perturb:
        with torch.no_grad():
            for p in fm.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return fm


def qkv(b=2, n=6, m=6, dtype=F64, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, H, n, D, generator=g, dtype=dtype),
            scale * torch.randn(b, H, m, D, generator=g, dtype=dtype),
            torch.randn(b, H, m, D, generator=g, dtype=dtype))


# -- slow references, fp64, from the papers' formulas ---------------------------------------
def phi_reference(fm, x: torch.Tensor, *, query: bool) -> torch.Tensor:
    """φ itself (not its log), written from each paper's formula: Hedgehog and T2R on the
    head's q or k as given, FAVOR+ on x̂ = d^(−1/4) x."""
    xh = x.to(F64) * x.shape[-1] ** -0.25
    if isinstance(fm, HedgehogFeatures):
        p = "" if fm.shared_qk else ("query_" if query else "key_")
        w, b = getattr(fm, p + "weight").to(F64), getattr(fm, p + "bias")
        z = torch.einsum("bhnd,hdf->bhnf", x.to(F64), w) + (0 if b is None else b.to(F64)[:, None])
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)
    if isinstance(fm, T2RFeatures):
        p = "" if fm.shared_qk else ("query_" if query else "key_")
        w, b = getattr(fm, p + "weight").to(F64), getattr(fm, p + "bias")
        return torch.relu(torch.einsum("bhnd,hfd->bhnf", x.to(F64), w)
                          + (0 if b is None else b.to(F64)[:, None]))
    w = fm.weight.to(F64)
    return torch.exp(torch.einsum("bhnd,hrd->bhnr", xh, w) - xh.square().sum(-1, True) / 2)


def linear_attention_reference(fm, q, k, v, *, causal=False, key_padding_mask=None):
    """D⁻¹ (φ(Q)φ(K)ᵀ ⊙ M) V, with 0 for rows without weight."""
    a = phi_reference(fm, q, query=True) @ phi_reference(fm, k, query=False).transpose(-2, -1)
    n, m = a.shape[-2:]
    if causal:
        a = a * torch.ones(n, m, dtype=torch.bool).tril(m - n)
    if key_padding_mask is not None:
        a = a * key_padding_mask[:, None, None, :]
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v.to(F64)) / torch.where(den > 0, den, 1), 0.0)


# -- the maps themselves --------------------------------------------------------------------
def test_hedgehog_at_identity_init_is_its_formula():
    fm = HedgehogFeatures(n_heads=H, head_dim=D)
    for name, p in fm.named_parameters():
        want = torch.eye(D).expand(H, D, D) if name.endswith("weight") else torch.zeros(H, D)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)
    x = torch.randn(3, H, 5, D, dtype=F64)  # the head's q or k; the kernel passes d^(-1/4) x
    got = fm.double()(x * D ** -0.25, torch.empty(0, D), query=False).exp()
    want = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)  # W = I, b = 0
    torch.testing.assert_close(got, want)
    # through the kernel: the paper's linear attention with φ(q)ᵀφ(k) on the raw q, k
    q, k, v = qkv()
    pq = torch.cat([torch.softmax(q, -1), torch.softmax(-q, -1)], -1)
    pk = torch.cat([torch.softmax(k, -1), torch.softmax(-k, -1)], -1)
    a = pq @ pk.transpose(-2, -1)
    want = (a @ v) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(favor_attention(q, k, v, torch.empty(0, D, dtype=F64),
                                               feature_map=fm), want)


def test_t2r_is_relu_of_an_affine_map_per_head():
    fm = built("t2r")
    x = torch.randn(2, H, 5, D, dtype=F64)
    want = torch.relu(torch.einsum("bhnd,hfd->bhnf", x, fm.weight) + fm.bias[:, None])
    torch.testing.assert_close(fm(x * D ** -0.25, None, query=True), want)  # on the raw x
    assert not fm.exponential and fm.num_features(999) == 12  # F = the attention's r


def test_learned_favor_at_init_equals_random_favor_with_the_same_w():
    """Unbiased at init: the attention equals PerformerAttention's own random features."""
    torch.manual_seed(0)
    for causal in (False, True):
        ref = PerformerAttention(32, 2, nb_features=16, seed=5, layer=3, causal=causal)
        attn = PerformerAttention(32, 2, nb_features=16, seed=5, layer=3, causal=causal,
                                  feature_map=LearnedPositiveFeatures())
        attn.load_state_dict(ref.state_dict(), strict=False)
        for h in range(2):
            torch.testing.assert_close(attn.feature_map.weight[h], ref.projection, rtol=0, atol=0)
        x = torch.randn(2, 9, 32)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 6:] = False
        torch.testing.assert_close(attn(x, mask=mask), ref(x, mask=mask), rtol=1e-5, atol=1e-6)


def _call(fm, x, *params, query):
    return fm(x, None, query=query)  # params are fm's own tensors, perturbed in place


@pytest.mark.parametrize("name", SPECS)
def test_gradcheck_map_alone(name):
    fm = built(name)
    x = torch.randn(1, H, 3, D, dtype=F64, requires_grad=True)
    params = tuple(fm.parameters())
    for query in (True, False):
        assert torch.autograd.gradcheck(functools.partial(_call, fm, query=query), (x, *params))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_gradcheck_through_favor_attention(name, causal):
    """∂out/∂(q, k, v, every parameter of the map), fp64, bidirectional and causal (the
    causal exponential path is the fused custom op with its own backward)."""
    fm = built(name)
    q, k, v = (t.requires_grad_() for t in qkv(b=1, n=4, m=4))
    mask = torch.tensor([[True, True, True, False]])
    w = torch.empty(0, D, dtype=F64)

    def fn(q, k, v, *params):  # params are fm's own tensors: gradcheck perturbs them in place
        return favor_attention(q, k, v, w, feature_map=fm, causal=causal, key_padding_mask=mask,
                               chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q, k, v, *fm.parameters()))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_kernel_equals_quadratic_reference(name, causal):
    fm = built(name)
    q, k, v = qkv(n=7, m=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    got = favor_attention(q, k, v, torch.empty(0, D, dtype=F64), feature_map=fm, causal=causal,
                          key_padding_mask=mask, chunk_size=3)
    want = linear_attention_reference(fm, q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(got, want)


@given(name=st.sampled_from(sorted(SPECS)), causal=st.booleans(), b=st.integers(1, 3),
       n=st.integers(1, 7), m=st.integers(1, 7), chunk=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_reference_over_shapes_and_masks(name, causal, b, n, m, chunk, seed):
    """Cross lengths (causal: bottom-right aligned), random padding incl. samples with no
    real key (rows give 0, never NaN), any chunk size of the causal scan."""
    fm = built(name, seed=seed % 1000)
    q, k, v = qkv(b=b, n=n, m=m, seed=seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, m, generator=g) < 0.7
    got = favor_attention(q, k, v, torch.empty(0, D, dtype=F64), feature_map=fm, causal=causal,
                          key_padding_mask=mask, chunk_size=chunk)
    want = linear_attention_reference(fm, q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_hedgehog_log_features_stay_exact_where_softmax_underflows(causal):
    """Why Hedgehog returns log_softmax (an exponential map): at per-head norms ~ 1700 the
    features themselves underflow in fp32 (φ(q)ᵀφ(k) = 0 for whole rows), while the kernel's
    stabilisers on log φ stay at the fp64 log-sum-exp reference."""
    fm64 = built("hedgehog")
    fm = copy.deepcopy(fm64).float()
    q, k, v = qkv(n=8, m=8, dtype=torch.float32, scale=600.0)
    got = favor_attention(q, k, v, torch.empty(0, D), feature_map=fm, causal=causal)
    # reference: log A_ij = logsumexp_f(log φ(q_i)_f + log φ(k_j)_f), softmax over j, fp64
    def log_phi(x, query):  # the paper's formula, in the log domain, fp64
        p = "query_" if query else "key_"
        z = (torch.einsum("bhnd,hdf->bhnf", x.double(), getattr(fm64, p + "weight"))
             + getattr(fm64, p + "bias")[:, None])
        return torch.cat([torch.log_softmax(z, -1), torch.log_softmax(-z, -1)], -1)

    lq, lk = log_phi(q, True), log_phi(k, False)
    logits = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], -1)
    if causal:
        logits = logits.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    want = torch.softmax(logits, -1) @ v.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # the plain (non-log) features in fp32: rows of zeros, so the formula itself gives 0/0
    pq, pk = lq.float().exp(), lk.float().exp()
    assert ((pq @ pk.transpose(-2, -1)).sum(-1) == 0).any()


# -- through PerformerAttention -------------------------------------------------------------
def attention(name: str, *, causal=False, seed=0, **kw) -> PerformerAttention:
    torch.manual_seed(seed)
    attn = PerformerAttention(32, H, nb_features=12, seed=seed, causal=causal,
                              feature_map=SPECS[name](), **kw)
    with torch.no_grad():
        for p in attn.feature_map.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return attn


@pytest.mark.parametrize("name", SPECS)
def test_partial_gives_every_layer_its_own_parameters(name):
    spec = SPECS[name]()
    cfg = EncoderConfig(d_model=32, n_heads=4, n_layers=2, d_ff=64,
                        attention=functools.partial(PerformerAttention, nb_features=12,
                                                    feature_map=spec))
    enc = Encoder(cfg)
    maps = [layer.attention.feature_map for layer in enc.layers]
    assert maps[0] is not maps[1] and maps[0] is not spec and not spec.built
    assert maps[0].n_heads == 4 and maps[0].head_dim == 8
    p0, p1 = (dict(m.named_parameters()) for m in maps)
    assert p0 and all(p0[k].data_ptr() != p1[k].data_ptr() for k in p0)
    names = {n for n, _ in enc.named_parameters()}
    assert any(n.startswith("layers.0.attention.feature_map.") for n in names)
    x = torch.randn(2, 5, 32)
    enc(x).square().sum().backward()
    for m in maps:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # a different (n_heads, head_dim): the same spec builds to that layer's sizes
    other = PerformerAttention(24, 3, nb_features=12, feature_map=spec)
    assert (other.feature_map.n_heads, other.feature_map.head_dim) == (3, 8)


@pytest.mark.parametrize("name", SPECS)
def test_state_dict_round_trip(name):
    src = attention(name, causal=True)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    keys = [k for k in src.state_dict() if k.startswith("feature_map.")]
    assert keys, "the map's parameters must be in the attention's state_dict"
    dst = attention(name, causal=True, seed=9)  # other initial values
    x = torch.randn(2, 7, 32)
    assert not torch.allclose(dst(x), src(x))
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", SPECS)
def test_causal_a_future_token_changes_no_past_output(name):
    attn = attention(name, causal=True, chunk_size=3)
    x = torch.randn(2, 9, 32)
    y = x.clone()
    y[:, 6] = 50 * torch.randn(2, 32)  # a large future key moves no earlier output
    torch.testing.assert_close(attn(y)[:, :6], attn(x)[:, :6], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rotary", [None, RotaryMode.QUERY_KEY, RotaryMode.NUMERATOR])
@pytest.mark.parametrize("name", SPECS)
def test_decode_equals_parallel(name, rotary):
    extra = {} if rotary is None else dict(positional=RotaryEmbedding(head_dim=16),
                                           rotary=rotary)
    attn = attention(name, causal=True, **extra).double()
    x = torch.randn(2, 8, 32, dtype=F64)
    want = attn(x)
    state = None
    for t in range(8):
        out, state = attn.step(x[:, t:t + 1], state)
        torch.testing.assert_close(out, want[:, t:t + 1], rtol=1e-9, atol=1e-10)
    width = attn.feature_map.num_features(12)
    assert state.numerator.shape == (2, H, width, 16)  # O(F·d) per head


@pytest.mark.parametrize("name", SPECS)
def test_rotary_numerator_mode_is_relative(name):
    """Su's numerator-only form with learned features: shifting every position leaves the
    output unchanged (also bidirectional)."""
    attn = attention(name, positional=RotaryEmbedding(head_dim=16),
                     rotary=RotaryMode.NUMERATOR).double()
    x = torch.randn(2, 8, 32, dtype=F64)
    torch.testing.assert_close(attn(x, positions=torch.arange(8) + 40), attn(x))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_padding_invariance(name, causal):
    """Padded keys change nothing: real rows equal the unpadded sequence's."""
    attn = attention(name, causal=causal)
    x = torch.randn(1, 5, 32)
    padded = torch.cat([x, 100 * torch.randn(1, 3, 32)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(attn(padded, mask=mask)[:, :5], attn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_fp32_features_under_autocast(name):
    attn = attention(name, causal=True)
    x = torch.randn(2, 6, 32)
    want = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x)
        assert got.dtype == torch.bfloat16
        got.float().sum().backward()
    assert all(p.grad is not None for p in attn.feature_map.parameters())
    assert (got.float() - want).abs().max() < 0.1  # bf16 projections; features in fp32


# -- errors -----------------------------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="redraw would change nothing"):
        PerformerAttention(32, 2, feature_map=HedgehogFeatures(), redraw_interval=10)
    with pytest.raises(ValueError, match=r"is a spec without parameters"):
        HedgehogFeatures()(torch.randn(1, 2, 3, 8), None, query=True)
    fm = HedgehogFeatures(n_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"expected \(batch, heads=2, seq, head_dim=8\), got "
                                         r"\(1, 3, 4, 8\)"):
        fm(torch.randn(1, 3, 4, 8), None, query=True)
    with pytest.raises(TypeError, match="floating"):
        fm(torch.ones(1, 2, 4, 8, dtype=torch.long), None, query=True)
    with pytest.raises(ValueError, match=r"built for \(n_heads=2, head_dim=8\) but this "
                                         r"attention has \(n_heads=4, head_dim=8\)"):
        PerformerAttention(32, 4, feature_map=fm)
    with pytest.raises(ValueError, match="feature_dim"):
        HedgehogFeatures(feature_dim=0)
    with pytest.raises(TypeError, match="shared_qk: expected a bool"):
        T2RFeatures(shared_qk="yes")
    with pytest.raises(ValueError, match="give both n_heads and head_dim"):
        T2RFeatures(n_heads=2)
    with pytest.raises(ValueError, match="give feature_dim"):
        T2RFeatures(n_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"projection: expected \(nb_features, head_dim=8\)"):
        LearnedPositiveFeatures(n_heads=2, head_dim=8, projection=torch.randn(4, 6))


def test_a_built_map_is_copied_not_shared():
    fm = HedgehogFeatures(n_heads=2, head_dim=16)
    with torch.no_grad():
        fm.query_bias.fill_(0.5)
    a, b = (PerformerAttention(32, 2, feature_map=fm) for _ in range(2))
    assert a.feature_map is not fm and a.feature_map is not b.feature_map
    torch.testing.assert_close(a.feature_map.query_bias, fm.query_bias)


def test_decode_kernel_with_a_learned_map_directly():
    fm = built("hedgehog")
    q, k, v = qkv(b=1, n=1, m=1)
    out, state = favor_decode_step(q, k, v, torch.empty(0, D, dtype=F64), feature_map=fm)
    torch.testing.assert_close(out, v)  # one key: its value
    assert state.numerator.shape == (1, H, 2 * D, D)


def test_reset_parameters_returns_to_init():
    for name in SPECS:
        if name == "t2r":
            continue  # random init
        fm = built(name, perturb=False)
        init = {n: p.detach().clone() for n, p in fm.named_parameters()}
        with torch.no_grad():
            for p in fm.parameters():
                p.add_(1.0)
        fm.reset_parameters()
        for n, p in fm.named_parameters():
            torch.testing.assert_close(p, init[n], rtol=0, atol=0)


@pytest.mark.slow
def test_compiles_fullgraph():
    """One graph (no break) through the map's parameters and the causal kernel (~1 min)."""
    attn = attention("hedgehog", causal=True).eval()
    x = torch.randn(2, 6, 32)
    compiled = torch.compile(attn, fullgraph=True)
    torch.testing.assert_close(compiled(x), attn(x), rtol=1e-5, atol=1e-6)


# -- the bridges: one spec, per-layer parameters, saved with the model ------------------------
def test_swap_attention_builds_a_map_per_layer():
    from torch import nn

    from transformer_zoo.interop import swap_attention

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    swap_attention(model, "performer", nb_features=12, seed=0,
                   feature_map=HedgehogFeatures())
    keys = [k for k in model.state_dict() if "feature_map" in k]
    assert {k.split(".")[1] for k in keys} == {"0", "1"}  # both layers, their own tensors
    maps = [m for m in model.modules() if isinstance(m, HedgehogFeatures)]
    assert len(maps) == 2 and maps[0].query_weight.data_ptr() != maps[1].query_weight.data_ptr()
    x = torch.randn(2, 5, 32)
    model(x).square().sum().backward()
    assert all(m.query_weight.grad is not None for m in maps)


def test_huggingface_bridge_state_dict_round_trip():
    transformers = pytest.importorskip("transformers")
    from transformer_zoo.interop import huggingface as hf

    def model():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=50,
                                      attn_implementation="sdpa")
        m = transformers.BertModel(cfg).eval()
        hf.use(m, "performer", nb_features=12, seed=0, feature_map=T2RFeatures())
        return m

    src, dst = model(), model()
    ids = torch.randint(0, 50, (2, 7))
    keys = [k for k in src.state_dict() if ".tz_attention.feature_map." in k]
    assert len(keys) == 4  # weight, bias per layer
    with torch.no_grad():
        for name, p in src.named_parameters():
            if ".feature_map." in name:
                p.add_(torch.randn_like(p))
    assert not torch.allclose(dst(ids).last_hidden_state, src(ids).last_hidden_state)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    torch.testing.assert_close(dst(ids).last_hidden_state, src(ids).last_hidden_state,
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", SPECS)
def test_meta_construction_then_reset_and_load(name):
    """Built on the meta device, materialised with to_empty, re-initialised by every
    submodule's reset_parameters (finite, the init of an eager build), then loaded."""
    with torch.device("meta"):
        attn = PerformerAttention(32, H, nb_features=12, seed=0, feature_map=SPECS[name]())
    attn.to_empty(device="cpu")
    for sub in attn.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    eager = PerformerAttention(32, H, nb_features=12, seed=0, feature_map=SPECS[name]())
    for (n, p), (_, e) in zip(attn.feature_map.named_parameters(),
                              eager.feature_map.named_parameters(), strict=True):
        assert torch.isfinite(p).all(), n
        if name != "t2r":  # T2R's init is random
            torch.testing.assert_close(p, e, rtol=0, atol=0)
    attn.load_state_dict(eager.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(attn(x), eager(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["hedgehog", "t2r"])
def test_huggingface_causal_generation_on_the_recurrent_state(name):
    """A causal HF model with a learned map: generate() on the kernel's recurrent state gives
    the same scores as recomputing the whole prefix (no cache) at every token."""
    transformers = pytest.importorskip("transformers")
    from transformer_zoo.interop import huggingface as hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=60,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    hf.use(model, "performer", nb_features=16, seed=0, feature_map=SPECS[name]())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".feature_map." in n:
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 60, (2, 5))
    runs = [model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=cache,
                           pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].scores, runs[1].scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
