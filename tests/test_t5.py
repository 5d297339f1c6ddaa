"""T5RelativeBias: table lookup by bucket, sharing across layers, shapes and validation."""

from __future__ import annotations

import pytest
import torch

from transformer_zoo import Encoder, EncoderConfig, SoftmaxAttention, T5RelativeBias
from transformer_zoo.functional.relative import t5_relative_bucket


@pytest.mark.parametrize("causal", [False, True])
def test_bias_is_table_at_bucket(causal):
    pe = T5RelativeBias(n_heads=3, num_buckets=16, max_distance=40, causal=causal)
    qp, kp = torch.arange(9) + 100, torch.arange(12) * 7
    bias = pe(torch.randn(2, 3, 9, 4), qp, kp)
    assert bias.shape == (1, 3, 9, 12)
    for i in range(9):
        for j in range(12):
            bucket = t5_relative_bucket(kp[j] - qp[i], causal=causal, num_buckets=16,
                                        max_distance=40)
            torch.testing.assert_close(bias[0, :, i, j], pe.weight[bucket], rtol=0, atol=0)
    batched = pe(torch.randn(2, 3, 9, 4), torch.stack((qp, qp - 100)), torch.stack((kp, kp)))
    assert batched.shape == (2, 3, 9, 12)
    torch.testing.assert_close(batched[0], bias[0], rtol=0, atol=0)


def test_shared_across_layers_when_one_instance():
    shared = T5RelativeBias(n_heads=4)
    enc = Encoder(EncoderConfig(d_model=32, n_heads=4, n_layers=3, positional=shared))
    tables = {id(layer.attention.positional.weight) for layer in enc.layers}
    assert len(tables) == 1
    assert sum(p is shared.weight for p in enc.parameters()) == 1
    per_layer = Encoder(EncoderConfig(d_model=32, n_heads=4, n_layers=3,
                                      positional=lambda: T5RelativeBias(n_heads=4)))
    assert len({id(layer.attention.positional.weight) for layer in per_layer.layers}) == 3
    out = enc(torch.randn(2, 5, 32))
    out.sum().backward()
    assert shared.weight.grad is not None and shared.weight.grad.abs().sum() > 0


def test_validation():
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(n_heads=2, num_buckets=32, max_distance=8)
    pe = T5RelativeBias(n_heads=2)
    with pytest.raises(ValueError, match="n_heads=2"):
        pe(torch.randn(1, 3, 4, 8), torch.arange(4), torch.arange(4))
    with pytest.raises(TypeError):
        T5RelativeBias(2)  # type: ignore[misc]


def test_causal_buckets_need_causal_attention_and_equal_heads():
    """Causal buckets send future keys to bucket 0: only right under a causal mask."""
    pe = T5RelativeBias(n_heads=4, causal=True)
    bias = pe(torch.randn(1, 4, 5, 2), torch.arange(5), torch.arange(5))
    assert torch.equal(bias[0, :, 0, 4], bias[0, :, 0, 0])  # future == present, unmasked
    with pytest.raises(ValueError, match="causal=True"):
        SoftmaxAttention(16, 4, positional=pe)
    with pytest.raises(ValueError, match="n_heads=2"):
        SoftmaxAttention(16, 2, causal=True, positional=T5RelativeBias(n_heads=4, causal=True))
    SoftmaxAttention(16, 4, causal=True, positional=pe)  # the intended pairings build
    SoftmaxAttention(16, 4, positional=T5RelativeBias(n_heads=4))
