"""Absolute encodings added to the input: sinusoidal (exact formula) and learned."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo import LearnedPositionalEncoding, Place, SinusoidalPositionalEncoding
from transformer_zoo.functional import sinusoidal_encoding

even_dims = st.integers(1, 32).map(lambda x: 2 * x)


@given(even_dims, st.lists(st.integers(0, 10**7), min_size=1, max_size=8),
       st.sampled_from([10000.0, 500.0]))
def test_sinusoidal_exact_formula(d, positions, base):
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)), in fp64 math."""
    pe = SinusoidalPositionalEncoding(d, base=base)(torch.tensor(positions))
    assert pe.shape == (len(positions), d) and pe.dtype == torch.float32
    want = torch.tensor([
        [
            math.sin(p / base ** (c / d)) if c % 2 == 0 else math.cos(p / base ** ((c - 1) / d))
            for c in range(d)
        ]
        for p in positions
    ])
    # exact to fp32 rounding of the result at any position (the angle is formed in fp64)
    torch.testing.assert_close(pe, want, rtol=0, atol=1.2e-7)


@given(even_dims, st.integers(0, 10**6), st.integers(-100, 300))
def test_sinusoidal_shift_is_a_fixed_rotation(d, p, k):
    """PE(p + k) = M_k PE(p), M_k block-diagonal 2×2 rotations that do not depend on p."""
    p = max(p, -k)  # keep p + k >= 0
    omega = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    c, s = torch.cos(k * omega), torch.sin(k * omega)
    # (sin a, cos a) -> (sin(a + kω), cos(a + kω)) = [[c, s], [-s, c]] (sin a, cos a)
    blocks = [torch.tensor([[ci, si], [-si, ci]]) for ci, si in zip(c, s, strict=True)]
    m_k = torch.block_diag(*blocks).double()
    pe = SinusoidalPositionalEncoding(d)
    here, there = pe(torch.tensor([p])).double(), pe(torch.tensor([p + k])).double()
    torch.testing.assert_close(there[0], m_k @ here[0], rtol=0, atol=1e-6)


def test_sinusoidal_any_position_and_batch_layout():
    pe = SinusoidalPositionalEncoding(8)
    far = pe(torch.tensor([10**9, 2**40]))
    assert torch.isfinite(far).all() and far.abs().max() <= 1
    batched = torch.tensor([[0, 1, 2], [5, 6, 7]])
    out = pe(batched)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out[1], pe(batched[1]))
    assert torch.equal(pe(torch.tensor([0]))[0], torch.tensor([0.0, 1.0] * 4))
    assert pe.place is Place.INPUT and list(pe.parameters()) == []
    assert torch.equal(sinusoidal_encoding(batched, 8), out)


def test_sinusoidal_bad_arguments():
    with pytest.raises(ValueError, match="even size, got 7"):
        SinusoidalPositionalEncoding(7)
    with pytest.raises(TypeError, match="expected int64, got dtype torch.int32"):
        SinusoidalPositionalEncoding(8)(torch.arange(3, dtype=torch.int32))


@pytest.mark.cpu_only
@given(st.integers(1, 20), st.integers(1, 12), st.integers(1, 3), st.integers(1, 6),
       st.integers(0, 2**31 - 1))
def test_learned_is_a_table_lookup(max_len, d, b, n, seed):
    g = torch.Generator().manual_seed(seed)
    pe = LearnedPositionalEncoding(max_len, d)
    positions = torch.randint(0, max_len, (b, n), generator=g)
    out = pe(positions)
    assert out.shape == (b, n, d)
    for i in range(b):
        for j in range(n):
            assert torch.equal(out[i, j], pe.weight[positions[i, j]])
    assert pe(positions[0]).shape == (n, d)


def test_learned_gradient_reaches_only_used_rows():
    pe = LearnedPositionalEncoding(6, 4)
    pe(torch.tensor([1, 3, 3])).sum().backward()
    used = pe.weight.grad.abs().sum(-1)
    assert torch.equal(used != 0, torch.tensor([False, True, False, True, False, False]))
    torch.testing.assert_close(pe.weight.grad[3], torch.full((4,), 2.0))


def test_learned_init_std():
    pe = LearnedPositionalEncoding(4096, 16, init_std=0.02)
    assert abs(pe.weight.std().item() - 0.02) < 1e-3
    assert "max_len=4096" in repr(pe)


@pytest.mark.parametrize("bad", [[0, 8], [-1, 2], [100]])
def test_learned_positions_outside_table_raise(bad):
    pe = LearnedPositionalEncoding(8, 4)
    with pytest.raises(ValueError, match=r"expected values in \[0, max_len\) = \[0, 8\), got"):
        pe(torch.tensor(bad))
    with pytest.raises(TypeError, match="expected int64"):
        pe(torch.tensor(bad, dtype=torch.int32))
