"""RoPE length extension (YaRN, dynamic NTK, Llama 3.1, LongRoPE) and xPos: frequencies and
attention factors equal transformers' ROPE_INIT_FUNCTIONS (fp32) and a fp64/mpmath reference
written here, rotated q/k equal HF's apply_rotary_pos_emb, the HF config builder, the dynamic
NTK cache behaviour (transformers#25104), exact int64 angles, the Performer refusal, and xPos
against rotary-embedding-torch."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_zoo import (
    DynamicNTKScaling,
    Llama3Scaling,
    LongRoPEScaling,
    PerformerAttention,
    RotaryEmbedding,
    RotaryLayout,
    RotaryMode,
    SoftmaxAttention,
    XPosEmbedding,
    YaRNScaling,
)
from transformer_zoo.functional import rope_scaling as F

transformers = pytest.importorskip("transformers")
llama = pytest.importorskip("transformers.models.llama.modeling_llama")
rotary_embedding_torch = pytest.importorskip("rotary_embedding_torch")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

transformers.logging.set_verbosity_error()  # HF warns on implicit factors; not our concern
CPU = torch.device("cpu")


def hf_config(rope: dict, *, head_dim: int = 64, max_pos: int = 16384) -> LlamaConfig:
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=dict(rope))


def hf_init(rope: dict, seq_len: int | None, **kw) -> tuple[torch.Tensor, float]:
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config(rope, **kw), CPU, seq_len=seq_len)


def assert_freqs_match_hf(rope: dict, seq_len: int | None, head_dim: int = 64, **kw) -> None:
    inv, factor = hf_init(rope, seq_len, head_dim=head_dim, **kw)
    ours = RotaryEmbedding.from_hf_config(hf_config(rope, head_dim=head_dim, **kw))
    got = ours.frequencies(ours.rotary_dim, CPU, seq_len=seq_len)
    # HF computes base**(2i/r) in fp32: relative error up to ~ulp·2i/r·ln(base) < 2e-6
    torch.testing.assert_close(got, inv.double(), rtol=2e-6, atol=0)
    assert ours.attention_scaling == pytest.approx(factor, rel=1e-12, abs=0)


BASES = st.sampled_from([10000.0, 500000.0, 1e6, 50000.0])
HEADS = st.sampled_from([32, 64, 128])
PARTIAL = st.sampled_from([1.0, 0.5, 0.25])
FACTORS = st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0, 40.0, 2.5])
L0 = st.sampled_from([256, 2048, 4096, 8192, 32768])


@settings(max_examples=40, deadline=None)
@given(base=BASES, head_dim=HEADS, partial=PARTIAL, factor=FACTORS, original=L0,
       beta=st.sampled_from([(32, 1), (16, 2), (64, 0.5), (None, None), (8, 8)]),
       mscale=st.sampled_from([(None, None), (1.0, 1.0), (1.0, 0.707), (0.707, 0.0)]),
       truncate=st.sampled_from([True, False, None]))
def test_yarn_matches_hf(base, head_dim, partial, factor, original, beta, mscale, truncate):
    rope = {"rope_type": "yarn", "rope_theta": base, "factor": factor,
            "original_max_position_embeddings": original, "partial_rotary_factor": partial}
    if beta[0] is not None:
        rope.update(beta_fast=beta[0], beta_slow=beta[1])
    if mscale[0] is not None:
        rope.update(mscale=mscale[0], mscale_all_dim=mscale[1])
    if truncate is not None:
        rope["truncate"] = truncate
    assert_freqs_match_hf(rope, None, head_dim)


def test_yarn_explicit_attention_factor_and_implicit_factor_match_hf():
    assert_freqs_match_hf({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8,
                           "original_max_position_embeddings": 4096}, None)
    # a stored "truncate": None is falsy in HF (no truncation), beta 0/None mean the defaults
    assert_freqs_match_hf({"rope_type": "yarn", "factor": 4.0, "truncate": None,
                           "beta_fast": 0, "beta_slow": None,
                           "original_max_position_embeddings": 4096}, None)
    # factor None: HF takes max_position_embeddings / original (DeepSeek-V3's convention)
    assert_freqs_match_hf({"rope_type": "yarn", "factor": None,
                           "original_max_position_embeddings": 4096}, None, max_pos=32768)


@settings(max_examples=30, deadline=None)
@given(base=BASES, head_dim=HEADS, partial=PARTIAL, factor=FACTORS,
       seq_len=st.one_of(st.none(), st.integers(1, 200_000)))
def test_dynamic_ntk_matches_hf(base, head_dim, partial, factor, seq_len):
    rope = {"rope_type": "dynamic", "rope_theta": base, "factor": factor,
            "partial_rotary_factor": partial}
    assert_freqs_match_hf(rope, seq_len, head_dim, max_pos=4096)


@settings(max_examples=30, deadline=None)
@given(base=BASES, head_dim=HEADS, partial=PARTIAL, factor=FACTORS, original=L0,
       bands=st.sampled_from([(1.0, 4.0), (2.0, 8.0), (0.5, 1.0), (1.0, 32.0)]))
def test_llama3_matches_hf(base, head_dim, partial, factor, original, bands):
    rope = {"rope_type": "llama3", "rope_theta": base, "factor": factor,
            "original_max_position_embeddings": original, "low_freq_factor": bands[0],
            "high_freq_factor": bands[1], "partial_rotary_factor": partial}
    assert_freqs_match_hf(rope, None, head_dim, max_pos=original * 16)


@settings(max_examples=30, deadline=None)
@given(base=BASES, half=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**31),
       original=L0, seq_len=st.one_of(st.none(), st.integers(1, 300_000)),
       factor=st.sampled_from([None, 1.0, 8.0]),
       attention=st.sampled_from([None, 1.2]))
def test_longrope_matches_hf(base, half, seed, original, seq_len, factor, attention):
    g = torch.Generator().manual_seed(seed)
    rope = {"rope_type": "longrope", "rope_theta": base,
            "short_factor": (1 + torch.rand(half, generator=g)).tolist(),
            "long_factor": (1 + 30 * torch.rand(half, generator=g)).tolist(),
            "original_max_position_embeddings": original}
    if factor is not None:
        rope["factor"] = factor
    if attention is not None:
        rope["attention_factor"] = attention
    assert_freqs_match_hf(rope, seq_len, 2 * half, max_pos=original * 32)


# -- an independent 50-digit reference of the formulas (the papers' definitions) -------------
mpmath.mp.dps = 50


def mp_theta(r: int, base: float) -> list:
    return [mpmath.mpf(base) ** (mpmath.mpf(-2 * i) / r) for i in range(r // 2)]


def mp_yarn(r, base, s, original, beta_fast, beta_slow):
    def at(beta):  # fp64 as HF (the thresholds are fp64 numbers), then truncated
        return r * math.log(original / (beta * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = max(math.floor(at(beta_fast)), 0), min(math.ceil(at(beta_slow)), r - 1)
    hi = hi + 0.001 if lo == hi else hi
    out = []
    for i, t in enumerate(mp_theta(r, base)):
        ramp = mpmath.mpf(min(max((mpmath.mpf(i) - lo) / (mpmath.mpf(hi) - lo), 0), 1))
        out.append(t * (ramp / s + 1 - ramp))
    return out


def mp_llama3(r, base, s, low, high, original):
    out = []
    for t in mp_theta(r, base):
        wavelen = 2 * mpmath.pi / t
        if wavelen < mpmath.mpf(original) / high:
            out.append(t)
        elif wavelen > mpmath.mpf(original) / low:
            out.append(t / s)
        else:
            smooth = (original / wavelen - low) / (mpmath.mpf(high) - low)
            out.append((1 - smooth) * t / s + smooth * t)
    return out


@pytest.mark.parametrize("r,base,s,original", [(64, 10000.0, 4.0, 2048), (128, 1e6, 40.0, 4096),
                                               (32, 500000.0, 8.0, 8192)])
def test_frequencies_are_the_real_numbers(r, base, s, original):
    """θ'_i carried as θ_hi + θ_lo equals the 50-digit formula to ~1e-30 relative (what makes
    the angles exact at every int64 position); fp64 θ_hi is the correctly rounded value."""
    cases = [
        (F.yarn_frequencies(r, base=base, factor=s, original_max_position_embeddings=original,
                            extended=True), mp_yarn(r, base, s, original, 32, 1)),
        (F.llama3_frequencies(r, base=base, factor=s, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=original, extended=True),
         mp_llama3(r, base, s, 1.0, 4.0, original)),
        (F.longrope_frequencies(r, base=base, factors=[1.5 + i for i in range(r // 2)],
                                extended=True),
         [t / (mpmath.mpf(1.5) + i) for i, t in enumerate(mp_theta(r, base))]),
    ]
    for got, want in cases:
        for i, w in enumerate(want):
            dd = mpmath.mpf(float(got[0, i])) + mpmath.mpf(float(got[1, i]))
            assert abs(dd - w) <= 1e-30 * w, (i, dd, w)
            assert float(got[0, i]) == float(w)


EXACT_CASES = {
    "yarn": (YaRNScaling(factor=8.0, original_max_position_embeddings=4096),
             lambda: mp_yarn(64, 10000.0, 8.0, 4096, 32, 1)),
    "llama3": (Llama3Scaling(factor=8.0, original_max_position_embeddings=4096),
               lambda: mp_llama3(64, 10000.0, 8.0, 1.0, 4.0, 4096)),
    "longrope": (LongRoPEScaling(short_factor=[1.5 + i for i in range(32)],
                                 long_factor=[1.0] * 32, original_max_position_embeddings=16,
                                 factor=4.0),
                 lambda: [t / (mpmath.mpf(1.5) + i) for i, t in enumerate(mp_theta(64, 1e4))]),
}


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
@pytest.mark.parametrize("p", [2**40 + 12345, 2**53 + 1, 2**62 + 7, -(2**63)])
def test_scaled_angles_exact_at_huge_int64_positions(name, p):
    """The exact-angle machinery with per-dimension frequencies: the fp32 angles are the
    correctly rounded p·θ'_i mod 2π of the 50-digit θ'_i (half an fp32 ulp + 1e-11)."""
    scaling, reference = EXACT_CASES[name]
    rope = RotaryEmbedding(head_dim=64, scaling=scaling)
    got = rope.angles(torch.tensor([p]), seq_len=8)[0]  # LongRoPE: the short factors
    for i, t in enumerate(reference()):
        exact = mpmath.fmod(p * t, 2 * mpmath.pi)
        exact = exact + 2 * mpmath.pi if exact < 0 else exact
        d = abs(float(got[i]) - exact)
        d = float(min(d, 2 * mpmath.pi - d))
        assert d <= 0.5 * math.ulp(float(exact)) * 2**29 + 1e-11, (i, d)  # fp32 half-ulp


# -- rotated q/k against HF's rotary module + apply_rotary_pos_emb ----------------------------
SCALINGS_HF = [
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
     "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "longrope", "original_max_position_embeddings": 64, "factor": 4.0,
     "short_factor": [1.0 + 0.05 * i for i in range(16)],
     "long_factor": [1.0 + 0.9 * i for i in range(16)]},
    {"rope_type": "linear", "factor": 3.0},
]


@pytest.mark.parametrize("rope", SCALINGS_HF, ids=lambda c: c["rope_type"])
@pytest.mark.parametrize("n", [40, 300])  # below and above L₀ = 64 (dynamic, longrope switch)
def test_rotated_qk_equal_hf_apply_rotary_pos_emb(rope, n):
    torch.manual_seed(0)
    d = 32
    config = hf_config(rope, head_dim=d, max_pos=64)
    q, k = torch.randn(2, 4, n, d), torch.randn(2, 2, n, d)
    position_ids = torch.arange(n).expand(2, n)
    cos, sin = llama.LlamaRotaryEmbedding(config)(q, position_ids)
    hq, hk = llama.apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryEmbedding.from_hf_config(config)
    assert ours.layout is RotaryLayout.HALF_SPLIT
    pos = torch.arange(n)
    oq, ok = ours(q, k, pos, pos)
    tol = 4e-7 * n + 5e-6  # HF's fp32 angles: |p·θ|·2^-24 rad, times |q| (measured 4.5e-5)
    torch.testing.assert_close(oq, hq, rtol=0, atol=tol)
    torch.testing.assert_close(ok, hk, rtol=0, atol=tol)
    factor = ours.attention_scaling
    assert (oq.norm(dim=-1) / q.norm(dim=-1) - factor).abs().max() < 1e-5  # R·factor


def test_dynamic_ntk_in_decoding_follows_hf_and_its_cache_inconsistency():
    """transformers#25104: HF's dynamic NTK recomputes the base from max(position_ids) + 1 of
    each forward, so in generation every new token is rotated with a new base while the cached
    keys keep theirs. Ours (stateless, length = max position + 1 of the call) gives HF's
    rotations at every step; re-rotating the cached keys now would give other keys."""
    torch.manual_seed(0)
    d, prompt, L0 = 32, 100, 64
    rope_cfg = {"rope_type": "dynamic", "factor": 4.0}
    config = hf_config(rope_cfg, head_dim=d, max_pos=L0)
    hf_rope = llama.LlamaRotaryEmbedding(config)  # stateful: one instance across the steps
    ours = RotaryEmbedding.from_hf_config(config)
    x = torch.randn(1, 1, prompt + 4, d)
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, prompt + 4)]:
        pos = torch.arange(start, stop)
        cos, sin = hf_rope(x, pos[None])
        want, _ = llama.apply_rotary_pos_emb(x[:, :, start:stop], x[:, :, start:stop], cos, sin)
        got = ours.rotate(x[:, :, start:stop], pos)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the prompt's keys as cached (base at L = 100) vs the same keys re-rotated at L = 104
    cached = ours.rotate(x[:, :, :prompt], torch.arange(prompt))
    now = ours.rotate(x[:, :, :prompt], torch.arange(prompt), seq_len=prompt + 4)
    assert (cached - now).abs().max() > 1e-2
    # below L₀ the base is the plain one
    plain = RotaryEmbedding(head_dim=d, layout=RotaryLayout.HALF_SPLIT)
    short = torch.arange(L0)
    torch.testing.assert_close(ours.rotate(x[:, :, :L0], short), plain.rotate(x[:, :, :L0], short),
                               rtol=0, atol=0)


def test_forward_uses_one_length_for_q_and_k():
    """Length-dependent schemes read max over q and k positions (one base for both)."""
    rope = RotaryEmbedding(head_dim=16, scaling=DynamicNTKScaling(factor=4.0,
                                                                 max_position_embeddings=32))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 100, 16)
    qp, kp = torch.tensor([99]), torch.arange(100)
    rq, rk = rope(q, k, qp, kp)
    torch.testing.assert_close(rq, rope.rotate(q, qp, seq_len=100), rtol=0, atol=0)
    torch.testing.assert_close(rk, rope.rotate(k, kp, seq_len=100), rtol=0, atol=0)


STATIC = [
    YaRNScaling(factor=8.0, original_max_position_embeddings=256),
    Llama3Scaling(factor=8.0, original_max_position_embeddings=256),
    LongRoPEScaling(short_factor=[1.0 + i for i in range(8)], long_factor=[2.0] * 8,
                    original_max_position_embeddings=256, factor=8.0),
    DynamicNTKScaling(factor=4.0, max_position_embeddings=256),
]


@pytest.mark.parametrize("scaling", STATIC, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("layout", list(RotaryLayout))
@given(m=st.integers(0, 50_000), n=st.integers(0, 50_000), shift=st.integers(-10**6, 10**6))
@settings(max_examples=25, deadline=None)
def test_logits_depend_only_on_relative_position(scaling, layout, m, n, shift):
    """(R'_m q)ᵀ(R'_n k) = (R'_(m+t) q)ᵀ(R'_(n+t) k) for the per-dimension θ'_i at a fixed
    length (the length-dependent schemes are invariant only while the length stays)."""
    rope = RotaryEmbedding(head_dim=20, rotary_dim=16, layout=layout, scaling=scaling)
    g = torch.Generator().manual_seed(m ^ n)
    q, k = torch.randn(1, 1, 1, 20, generator=g), torch.randn(1, 1, 1, 20, generator=g)

    def logit(a, b):
        return (rope.rotate(q, torch.tensor([a]), seq_len=4096)
                * rope.rotate(k, torch.tensor([b]), seq_len=4096)).sum()

    torch.testing.assert_close(logit(m, n), logit(m + shift, n + shift), rtol=1e-4, atol=1e-4)


def test_attention_factor_scales_rotated_channels_only():
    scaling = YaRNScaling(factor=16.0, original_max_position_embeddings=512)
    for layout in RotaryLayout:
        rope = RotaryEmbedding(head_dim=24, rotary_dim=16, layout=layout, scaling=scaling)
        x, pos = torch.randn(2, 3, 7, 24, dtype=torch.float64), torch.arange(7) + 1000
        y = rope.rotate(x, pos)
        torch.testing.assert_close(y[..., 16:], x[..., 16:], rtol=0, atol=0)
        want = (1 + 0.1 * math.log(16.0)) * x[..., :16].norm(dim=-1)
        torch.testing.assert_close(y[..., :16].norm(dim=-1), want)
        assert torch.autograd.gradcheck(rope.rotate, (x[:1, :1].requires_grad_(), pos))


# -- the builder -------------------------------------------------------------------------------
def test_from_hf_config_forms_and_errors():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
            "rope_theta": 1e6}
    config = hf_config(rope, head_dim=64)
    a = RotaryEmbedding.from_hf_config(config)
    b = RotaryEmbedding.from_hf_config(config.to_dict())
    c = RotaryEmbedding.from_hf_config(rope, head_dim=64)
    d = RotaryEmbedding.from_hf_config({"type": "yarn", **{k: v for k, v in rope.items()
                                                          if k != "rope_type"}}, head_dim=64)
    for other in (b, c, d):
        assert other.scaling == a.scaling and other.base == a.base == 1e6
    assert isinstance(a.scaling, YaRNScaling) and a.rotary_dim == 64
    lin = RotaryEmbedding.from_hf_config({"rope_type": "linear", "factor": 2.0}, head_dim=8)
    assert lin.interpolation_factor == 2.0 and lin.scaling is None
    plain = RotaryEmbedding.from_hf_config({"rope_type": "default", "rope_theta": 500.0,
                                            "partial_rotary_factor": 0.5}, head_dim=8)
    assert (plain.base, plain.rotary_dim, plain.scaling) == (500.0, 4, None)
    with pytest.raises(ValueError, match="rope_type.*'proportional'"):
        RotaryEmbedding.from_hf_config({"rope_type": "proportional"}, head_dim=8)
    with pytest.raises(ValueError, match=r"unknown keys.*\['beta_fats'\]"):
        RotaryEmbedding.from_hf_config({**rope, "beta_fats": 16}, head_dim=64)
    with pytest.raises(ValueError, match="mrope_section"):
        RotaryEmbedding.from_hf_config({"rope_type": "default", "mrope_section": [16, 24, 24]},
                                       head_dim=8)
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding.from_hf_config(rope)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        RotaryEmbedding.from_hf_config({"rope_type": "dynamic", "factor": 2.0}, head_dim=8)
    with pytest.raises(ValueError, match="nested"):
        RotaryEmbedding.from_hf_config({"rope_parameters": {"full_attention": rope}},
                                       head_dim=8)
    with pytest.raises(TypeError, match="config"):
        RotaryEmbedding.from_hf_config(42)


def test_validation():
    yarn = YaRNScaling(factor=2.0, original_max_position_embeddings=128)
    with pytest.raises(ValueError, match="interpolation_factor=1"):
        RotaryEmbedding(head_dim=8, scaling=yarn, interpolation_factor=2.0)
    with pytest.raises(TypeError, match="RopeScaling"):
        RotaryEmbedding(head_dim=8, scaling={"rope_type": "yarn"})
    with pytest.raises(ValueError, match="factor"):
        YaRNScaling(factor=0.5, original_max_position_embeddings=128)
    with pytest.raises(ValueError, match="beta_fast"):
        YaRNScaling(factor=2.0, original_max_position_embeddings=128, beta_fast=1, beta_slow=4)
    with pytest.raises(ValueError, match="high_freq_factor"):
        Llama3Scaling(low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="rotary_dim 8, got 16"):
        RotaryEmbedding(head_dim=16, scaling=LongRoPEScaling(
            short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=8,
            factor=2.0))
    with pytest.raises(ValueError, match="long_factor"):
        LongRoPEScaling(short_factor=[1.0] * 4, long_factor=[2.0] * 3,
                        original_max_position_embeddings=8, factor=2.0)
    with pytest.raises(ValueError, match="factor.*attention_factor"):
        LongRoPEScaling(short_factor=[1.0], long_factor=[2.0], original_max_position_embeddings=8)
    with pytest.raises(TypeError, match="positional argument"):
        YaRNScaling(2.0, 128)  # keyword-only


def test_performer_numerator_refuses_scaled_frequencies():
    """RotaryMode.NUMERATOR rotates random features of another width: the per-dimension θ'_i
    and the attention factor are not defined there, so it is refused; QUERY_KEY works."""
    rope = RotaryEmbedding(head_dim=16, scaling=YaRNScaling(
        factor=4.0, original_max_position_embeddings=64))
    x = torch.randn(2, 10, 64)
    attn = PerformerAttention(64, 4, nb_features=32, seed=0, positional=rope,
                              rotary=RotaryMode.NUMERATOR)
    with pytest.raises(ValueError, match="RotaryMode.NUMERATOR"):
        attn(x)
    ok = PerformerAttention(64, 4, nb_features=32, seed=0, positional=rope)
    assert ok(x).shape == x.shape
    assert SoftmaxAttention(64, 4, causal=True, positional=rope)(x).isfinite().all()


# -- xPos --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotary_dim,scale_base", [(32, 512.0), (16, 64.0)])
def test_xpos_equals_rotary_embedding_torch(rotary_dim, scale_base):
    torch.manual_seed(0)
    n, d = 300, 32
    peer = rotary_embedding_torch.RotaryEmbedding(rotary_dim, use_xpos=True,
                                                  xpos_scale_base=scale_base)
    q, k = torch.randn(1, 4, n, d), torch.randn(1, 4, n, d)
    pq, pk = peer.rotate_queries_and_keys(q, k)
    xpos = XPosEmbedding(head_dim=d, rotary_dim=rotary_dim, scale_base=scale_base)
    pos = torch.arange(n)
    oq, ok = xpos(q, k, pos, pos)
    torch.testing.assert_close(oq, pq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ok, pk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", list(RotaryLayout))
@given(m=st.integers(0, 20_000), n=st.integers(0, 20_000), shift=st.integers(-20_000, 20_000))
@settings(max_examples=30, deadline=None)
def test_xpos_logit_depends_only_on_relative_position(layout, m, n, shift):
    """q̃_mᵀk̃_n = Σ_i ζ_i^((m−n)/γ)·(pair i of qᵀR_(n−m)k): a function of m − n (whatever
    center, which cancels); with m = n it is the plain qᵀk."""
    g = torch.Generator().manual_seed(m ^ n)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def logit(a, b, center):
        xpos = XPosEmbedding(head_dim=16, layout=layout, center=center)
        rq, rk = xpos(q, k, torch.tensor([a]), torch.tensor([b]))
        return (rq * rk).sum()

    ref = logit(m, n, m)
    scale = 1e-4 * (1 + abs(float(ref)))
    torch.testing.assert_close(logit(m + shift, n + shift, m + shift), ref, rtol=0, atol=scale)
    torch.testing.assert_close(logit(m, n, None), ref, rtol=1e-4, atol=scale)
    torch.testing.assert_close(logit(n, n, 0), (q * k).sum(), rtol=1e-4, atol=1e-4)


def test_xpos_decays_with_distance_in_causal_use():
    """The same q and k at growing distance m − n > 0 with zero rotation frequency left (a
    2-channel head whose only θ is 1 rotates; use the decay envelope): |logit| <= ζ_0^((m−n)/γ)
    ‖q‖‖k‖ — the envelope shrinks, which is what xPos adds to RoPE."""
    xpos = XPosEmbedding(head_dim=2, scale_base=8.0, center=0)
    q = k = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    zeta = (0 + 0.4 * 2) / (1.4 * 2)
    for dist in (1, 5, 20, 60):
        rq, rk = xpos(q, k, torch.tensor([dist]), torch.tensor([0]))
        env = zeta ** (dist / 8.0) * 2
        assert abs(float((rq * rk).sum())) <= env * (1 + 1e-6)
        assert float(rq.norm() * rk.norm()) == pytest.approx(env, rel=1e-6)


def test_xpos_validation_and_gradcheck():
    with pytest.raises(ValueError, match="scale_base"):
        XPosEmbedding(head_dim=8, scale_base=0.0)
    with pytest.raises(TypeError, match="center"):
        XPosEmbedding(head_dim=8, center=1.5)
    xpos = XPosEmbedding(head_dim=8, layout=RotaryLayout.HALF_SPLIT)
    with pytest.raises(ValueError, match="channels"):
        xpos(torch.randn(1, 1, 2, 6), torch.randn(1, 1, 2, 8), torch.arange(2), torch.arange(2))
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(5) + 30
    assert torch.autograd.gradcheck(lambda a, b: xpos(a, b, pos, pos), (q, k))
    assert not hasattr(xpos, "rotate")  # so Performer's RotaryMode.NUMERATOR refuses it


@pytest.mark.parametrize("scaling", STATIC[:2], ids=lambda s: type(s).__name__)
def test_static_scalings_compile_without_graph_breaks(scaling):
    rope = RotaryEmbedding(head_dim=16, layout=RotaryLayout.HALF_SPLIT, scaling=scaling)
    attn = SoftmaxAttention(64, 4, causal=True, positional=rope)
    x, pos = torch.randn(2, 7, 64), torch.arange(7) + 3
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, positions=pos), attn(x, positions=pos))


def test_xpos_scale_range_with_centred_positions():
    """Centred at the middle of the call's positions, the key scales ζ_0^(−(p − c)/γ) stay below
    fp16's 65504 for a span of 8000 positions at γ = 512 and pass it by 10000 (the docs'
    ~9000); fp32's 3.4e38 is passed between spans of 70000 and 75000."""
    xpos = XPosEmbedding(head_dim=8)
    for n, limit, inside in ((8000, 65504, True), (10000, 65504, False),
                             (70000, 3.4e38, True), (75000, 3.4e38, False)):
        pos = torch.arange(n) + 10**6
        c = xpos._center_for(pos, pos)
        top = float(xpos.scales(pos, c, sign=-1.0).double().max())
        assert (top < limit) is inside, (n, top)


@pytest.mark.parametrize("n", [50, 200])  # short factors up to L₀ = 64, long ones beyond
def test_phi3_longrope_config_equals_hf_phi3_rotary(n):
    """A Phi-3 config (original_max_position_embeddings at the top level, factor implied by
    max_position_embeddings / L₀ = 16): ours equals Phi3RotaryEmbedding + its
    apply_rotary_pos_emb, attention factor √(1 + ln 16 / ln 64) included."""
    phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")
    config = transformers.Phi3Config(
        hidden_size=128, num_attention_heads=4, max_position_embeddings=1024,
        original_max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(16)],
            "long_factor": [1.0 + 2 * i for i in range(16)], "rope_theta": 10000.0})
    x = torch.randn(1, 4, n, 32)
    cos, sin = phi3.Phi3RotaryEmbedding(config)(x, torch.arange(n)[None])
    hq, _ = phi3.apply_rotary_pos_emb(x, x, cos, sin)
    ours = RotaryEmbedding.from_hf_config(config)
    assert ours.attention_scaling == pytest.approx(math.sqrt(1 + math.log(16) / math.log(64)))
    oq, _ = ours(x, x, torch.arange(n), torch.arange(n))
    torch.testing.assert_close(oq, hq, rtol=0, atol=4e-7 * n + 5e-6)
