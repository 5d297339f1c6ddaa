"""Relative-position kernels: T5 buckets (the issue's tables, range, monotonicity, a slow
reference), ALiBi slopes and both bias forms, Shaw indices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from transformer_zoo.functional.relative import (
    alibi_bias,
    alibi_slopes,
    relative_positions,
    shaw_relative_index,
    t5_bucket_lookup,
    t5_relative_bucket,
)

DISTANCES = [0, 1, 7, 8, 11, 12, 15, 16, 24, 32, 64, 128, 500]
BIDIRECTIONAL_BEFORE = [0, 1, 7, 8, 8, 9, 9, 10, 11, 12, 14, 15, 15]
CAUSAL_BEFORE = [0, 1, 7, 8, 11, 12, 15, 16, 19, 21, 26, 31, 31]


def test_t5_bucket_tables_from_the_issue():
    before = -torch.tensor(DISTANCES)  # key before the query: r = key − query < 0
    after = torch.tensor(DISTANCES)
    assert t5_relative_bucket(before).tolist() == BIDIRECTIONAL_BEFORE
    assert t5_relative_bucket(after).tolist() == [0] + [b + 16 for b in BIDIRECTIONAL_BEFORE[1:]]
    assert t5_relative_bucket(before, causal=True).tolist() == CAUSAL_BEFORE
    assert t5_relative_bucket(after, causal=True).tolist() == [0] * len(DISTANCES)


def slow_t5_bucket(r: int, causal: bool, num_buckets: int, max_distance: int) -> int:
    """The T5 algorithm, one int at a time, log in numpy fp32 as the reference computes it."""
    offset = 0
    if causal:
        n = max(-r, 0)
    else:
        num_buckets //= 2
        offset = num_buckets if r > 0 else 0
        n = abs(r)
    max_exact = num_buckets // 2
    if n < max_exact:
        return offset + n
    scaled = np.log(np.float32(n) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    return offset + min(max_exact + int(np.float32(scaled)), num_buckets - 1)


@given(
    rel=st.lists(st.integers(-5000, 5000), min_size=1, max_size=40),
    causal=st.booleans(),
    num_buckets=st.sampled_from([8, 16, 32, 64]),
    max_distance=st.sampled_from([32, 128, 1000]),
)
def test_t5_bucket_matches_slow_reference_and_range(rel, causal, num_buckets, max_distance):
    # the exact range (half the per-direction buckets) must be shorter than max_distance;
    # other combinations are rejected (tested in test_t5_rejects_degenerate_configs below)
    assume(max_distance > (num_buckets if causal else num_buckets // 2) // 2)
    got = t5_relative_bucket(torch.tensor(rel), causal=causal, num_buckets=num_buckets,
                             max_distance=max_distance)
    assert got.dtype == torch.int64
    assert ((got >= 0) & (got < num_buckets)).all()
    want = [slow_t5_bucket(r, causal, num_buckets, max_distance) for r in rel]
    assert got.tolist() == want


@given(
    rel=st.lists(st.integers(-(10**12), 10**12) | st.integers(-300, 300), min_size=1,
                 max_size=40),
    causal=st.booleans(),
    num_buckets=st.sampled_from([4, 8, 32, 64]),
    max_distance=st.sampled_from([33, 128, 1000]),
)
def test_t5_table_lookup_is_bit_equal_to_the_formula(rel, causal, num_buckets, max_distance):
    r = torch.tensor(rel)
    kw = dict(causal=causal, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(t5_bucket_lookup(r, **kw), t5_relative_bucket(r, **kw))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 1000)])
def test_t5_bucket_monotone_in_distance(causal, num_buckets, max_distance):
    d = torch.arange(0, 3 * max_distance)
    before = t5_relative_bucket(-d, causal=causal, num_buckets=num_buckets,
                                max_distance=max_distance)
    assert (before.diff() >= 0).all() and before[-1] == num_buckets // (1 if causal else 2) - 1
    if not causal:
        after = t5_relative_bucket(d, num_buckets=num_buckets, max_distance=max_distance)
        assert (after[1:].diff() >= 0).all() and after[-1] == num_buckets - 1
        assert (after[1:] >= num_buckets // 2).all()


def test_t5_bucket_validation():
    with pytest.raises(ValueError, match="max_distance"):
        t5_relative_bucket(torch.arange(3), num_buckets=32, max_distance=4)
    with pytest.raises(ValueError, match="exact bucket"):
        t5_relative_bucket(torch.arange(3), num_buckets=2)


def reference_slopes(n: int) -> list[float]:
    """The paper's code (Press et al.), written out."""
    def power_of_2(k: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    c = 2 ** math.floor(math.log2(n))
    return power_of_2(c) + reference_slopes(2 * c)[0::2][: n - c]


def test_alibi_slopes_8_and_12_heads():
    assert alibi_slopes(8).tolist() == [2.0**-h for h in range(1, 9)]
    twelve = alibi_slopes(12).tolist()
    expected = [2.0**-h for h in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert twelve == pytest.approx(expected, rel=1e-6)


@given(n=st.integers(1, 100))
def test_alibi_slopes_match_reference_code(n):
    got = alibi_slopes(n)
    assert got.shape == (n,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx(reference_slopes(n), rel=1e-6)


def test_alibi_bias_forms():
    slopes = alibi_slopes(4)
    pos = torch.arange(6)
    sym = alibi_bias(slopes, pos, pos)
    causal = alibi_bias(slopes, pos, pos, causal=True)
    i, j = pos[:, None], pos[None, :]
    assert sym.shape == (1, 4, 6, 6)
    torch.testing.assert_close(sym[0], -slopes[:, None, None] * (i - j).abs().float())
    lower = j <= i
    torch.testing.assert_close(causal[0][:, lower], sym[0][:, lower], rtol=0, atol=0)
    # causal form equals the reference's per-key m·j after softmax under a causal mask
    logits = torch.randn(1, 4, 6, 6)
    per_key = slopes[:, None, None] * j.float()  # (h, 1, m)
    a = torch.softmax((logits + causal).masked_fill(~lower, float("-inf")), -1)
    b = torch.softmax((logits + per_key).masked_fill(~lower, float("-inf")), -1)
    torch.testing.assert_close(a, b)
    batched = alibi_bias(slopes, torch.stack((pos, pos + 7)), torch.stack((pos, pos + 7)))
    assert batched.shape == (2, 4, 6, 6)
    torch.testing.assert_close(batched[1], sym[0])


def test_relative_positions_and_shaw_index():
    q, k = torch.tensor([3, 4]), torch.tensor([0, 4, 9])
    assert relative_positions(q, k).tolist() == [[-3, 1, 6], [-4, 0, 5]]
    assert shaw_relative_index(q, k, 2).tolist() == [[0, 3, 4], [0, 2, 4]]
    assert relative_positions(torch.stack((q, q)), k).shape == (2, 2, 3)
    with pytest.raises(TypeError, match="int64"):
        relative_positions(q.float(), k)


def test_t5_rejects_degenerate_configs():
    with pytest.raises(ValueError, match="max_distance"):
        t5_relative_bucket(torch.tensor([0]), causal=True, num_buckets=64, max_distance=32)
