"""Parity with peers on the same inputs: HF transformers (T5 buckets, RoFormer and Llama rotary
application) and rotary-embedding-torch, including the latter's bf16 position defect."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from transformer_zoo import ALiBi, RotaryEmbedding, RotaryLayout, T5RelativeBias
from transformer_zoo.functional.relative import (
    alibi_slopes,
    relative_positions,
    t5_relative_bucket,
)
from transformer_zoo.functional.rotary import apply_rotary

t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
roformer = pytest.importorskip("transformers.models.roformer.modeling_roformer")
llama = pytest.importorskip("transformers.models.llama.modeling_llama")
rotary_embedding_torch = pytest.importorskip("rotary_embedding_torch")
bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
from transformers import LlamaConfig, T5Config  # noqa: E402


@given(
    rel=st.lists(st.integers(-100_000, 100_000), min_size=1, max_size=64),
    causal=st.booleans(),
    num_buckets=st.sampled_from([4, 8, 32, 64, 128]),
    max_distance=st.sampled_from([16, 128, 777, 4096]),
)
def test_t5_buckets_bit_equal_to_hf(rel, causal, num_buckets, max_distance):
    assume(max_distance > (num_buckets if causal else num_buckets // 2) // 2)  # else log(1) = 0
    r = torch.tensor(rel)
    ours = t5_relative_bucket(r, causal=causal, num_buckets=num_buckets, max_distance=max_distance)
    theirs = t5.T5Attention._relative_position_bucket(
        r, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(ours, theirs.long())


@pytest.mark.parametrize("causal", [False, True])
def test_t5_buckets_bit_equal_to_hf_on_a_full_grid(causal):
    pos = torch.arange(600)
    r = relative_positions(pos, pos)  # every distance in (−600, 600)
    theirs = t5.T5Attention._relative_position_bucket(r, bidirectional=not causal)
    assert torch.equal(t5_relative_bucket(r, causal=causal), theirs.long())


@pytest.mark.parametrize("causal", [False, True])
def test_t5_bias_equals_hf_compute_bias(causal):
    """Same table, same bias: HF's encoder (bidirectional) / decoder (causal) compute_bias."""
    config = T5Config(num_heads=4, is_decoder=causal)
    hf = t5.T5Attention(config, has_relative_attention_bias=True)
    ours = T5RelativeBias(n_heads=4, causal=causal)
    with torch.no_grad():
        ours.weight.copy_(hf.relative_attention_bias.weight)
    n, m = 40, 300
    theirs = hf.compute_bias(n, m)  # queries at 0..n-1, keys at 0..m-1
    got = ours(torch.randn(1, 4, n, 8), torch.arange(n), torch.arange(m))
    torch.testing.assert_close(got, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("heads", [8, 12, 16, 5])
def test_alibi_slopes_and_causal_softmax_match_hf_bloom(heads):
    """Bloom builds the per-key form m_h·j; our slopes are its slopes, and our causal form
    gives the same attention weights under a causal mask."""
    n = 9
    per_key = bloom.build_alibi_tensor(torch.ones(1, n, dtype=torch.long), heads,
                                       torch.float32).view(heads, 1, n)  # m_h·j
    torch.testing.assert_close(per_key[:, 0, 1], alibi_slopes(heads))
    logits = torch.randn(1, heads, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    ours = ALiBi(n_heads=heads, causal=True)(logits, torch.arange(n), torch.arange(n))
    a = torch.softmax((logits + ours).masked_fill(~causal, float("-inf")), -1)
    b = torch.softmax((logits + per_key).masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(a, b)


def test_roformer_interleaved_application():
    """HF RoFormer's table (numpy fp64, cast to fp32) and its application, interleaved."""
    n, d = 300, 32
    table = roformer.RoFormerSinusoidalPositionalEmbedding(n, d).create_weight()  # (n, d)
    q, k = torch.randn(2, 4, n, d), torch.randn(2, 4, n, d)
    hq, hk = roformer.RoFormerSelfAttention.apply_rotary_position_embeddings(
        table[None, None], q, k)
    rope = RotaryEmbedding(head_dim=d, layout=RotaryLayout.INTERLEAVED)
    pos = torch.arange(n)
    oq, ok = rope(q, k, pos, pos)
    # fp32 angles vs their fp64 ones: |Δ angle| <= 300·2^-24 ≈ 2e-5
    torch.testing.assert_close(oq, hq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ok, hk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_half_split_application(dtype):
    """HF Llama: its rotary module's cos/sin and ``apply_rotary_pos_emb``, half-split, with
    arbitrary batched position ids (offsets, left padding)."""
    d, theta = 64, 500000.0
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_theta=theta)
    position_ids = torch.stack((torch.arange(50) + 1000, torch.arange(50).clamp(min=3) - 3))
    q, k = torch.randn(2, 4, 50, d, dtype=dtype), torch.randn(2, 4, 50, d, dtype=dtype)
    cos, sin = llama.LlamaRotaryEmbedding(config)(q, position_ids)
    hq, hk = llama.apply_rotary_pos_emb(q, k, cos, sin)
    rope = RotaryEmbedding(head_dim=d, base=theta, layout=RotaryLayout.HALF_SPLIT)
    oq, ok = rope(q, k, position_ids, position_ids)
    # θ_i rounded differently (they take fp32 powers): |Δ angle| <= ~2·1050·2^-24 ≈ 1.3e-4
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(oq, hq, rtol=tol, atol=tol)
    torch.testing.assert_close(ok, hk, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "rotary_dim,interp,ntk", [(64, 1.0, 1.0), (32, 1.0, 1.0), (64, 4.0, 1.0), (64, 1.0, 8.0)])
def test_rotary_embedding_torch_fp32(rotary_dim, interp, ntk):
    n, d, offset = 200, 64, 17
    peer = rotary_embedding_torch.RotaryEmbedding(
        rotary_dim, interpolate_factor=interp, theta_rescale_factor=ntk)
    x = torch.randn(1, 4, n, d)
    theirs = peer.rotate_queries_or_keys(x, offset=offset)
    rope = RotaryEmbedding(head_dim=d, rotary_dim=rotary_dim, interpolation_factor=interp,
                           ntk_factor=ntk)
    ours = rope.rotate(x, torch.arange(n) + offset)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_rotary_embedding_torch_bf16_positions_collapse_ours_do_not():
    """The peer builds positions in the input dtype: in bf16, positions 4096..4159 round to
    multiples of 32 and rotate wrongly; ours stay within bf16 rounding of the fp32 result."""
    n, d, offset = 64, 64, 4096
    x = torch.randn(1, 4, n, d)
    exact = apply_rotary(x, torch.arange(n) + offset, dim=d)
    peer = rotary_embedding_torch.RotaryEmbedding(d)
    theirs = peer.rotate_queries_or_keys(x.bfloat16(), offset=offset).float()
    ours = apply_rotary(x.bfloat16(), torch.arange(n) + offset, dim=d).float()
    assert (ours - exact).abs().max() < 0.05
    assert (theirs - exact).abs().max() > 1.0
