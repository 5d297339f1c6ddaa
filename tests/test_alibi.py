"""ALiBi module: the bias it adds, its buffers, and the two forms inside attention."""

from __future__ import annotations

import pytest
import torch

from transformer_zoo import ALiBi, SoftmaxAttention
from transformer_zoo.functional.relative import alibi_slopes


def test_bias_values_and_no_saved_state():
    pe = ALiBi(n_heads=8)
    bias = pe(torch.randn(1, 8, 4, 2), torch.arange(4), torch.arange(6))
    assert bias.shape == (1, 8, 4, 6)
    assert bias[0, 0, 3, 0].item() == -0.5 * 3 and bias[0, 7, 0, 5].item() == -(2.0**-8) * 5
    assert pe.state_dict() == {}
    torch.testing.assert_close(pe.slopes, alibi_slopes(8))
    half = ALiBi(n_heads=12).half()
    assert half.slopes.dtype == torch.float32
    assert torch.equal(half.slopes, alibi_slopes(12))


def test_causal_and_symmetric_agree_under_causal_attention():
    x = torch.randn(2, 7, 24)
    torch.manual_seed(1)
    a = SoftmaxAttention(24, 6, causal=True, positional=ALiBi(n_heads=6, causal=True))
    torch.manual_seed(1)
    b = SoftmaxAttention(24, 6, causal=True, positional=ALiBi(n_heads=6))
    torch.testing.assert_close(a(x), b(x))
    # without a causal mask the symmetric form is what a bidirectional model needs: it
    # penalises keys on both sides (the per-key m·j form would favour far-right keys)
    sym = ALiBi(n_heads=6)(torch.randn(1, 6, 7, 4), torch.arange(7), torch.arange(7))
    torch.testing.assert_close(sym, sym.transpose(-1, -2))


def test_validation():
    with pytest.raises(ValueError, match="n_heads=4"):
        ALiBi(n_heads=4)(torch.randn(1, 2, 3, 8), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="positive"):
        ALiBi(n_heads=0)


def test_causal_form_needs_causal_attention_and_equal_heads():
    """ALiBi(causal=True) under bidirectional attention would reward distant future keys."""
    pe = ALiBi(n_heads=4, causal=True)
    bias = pe(torch.randn(1, 4, 5, 2), torch.arange(5), torch.arange(5))
    assert bias[0, 0, 0, 4] > 0  # the silent failure the check prevents
    with pytest.raises(ValueError, match="causal=True"):
        SoftmaxAttention(16, 4, positional=pe)
    with pytest.raises(ValueError, match="n_heads=2"):
        SoftmaxAttention(16, 2, causal=True, positional=ALiBi(n_heads=4, causal=True))
    SoftmaxAttention(16, 4, causal=True, positional=pe)  # the intended pairings build
    SoftmaxAttention(16, 4, positional=ALiBi(n_heads=4))
