"""Nyström attention: exact limits, padding/batch invariance, peers' defects, HF agreement."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    LogitBias,
    NystromAttention,
    RotaryEmbedding,
    SoftmaxAttention,
)
from transformer_zoo.functional import (
    explicit_softmax_attention,
    iterative_pinv,
    nystrom_attention,
    regularized_pinv,
)
from transformer_zoo.functional.nystrom import DEFAULT_PINV_RIDGE, segment_ids

F64 = torch.float64


#: (pinv_iterations, pinv_ridge): the paper's iteration, too many steps, a single step, the
#: default ridge, the exact pinv and a strong ridge
PINV_SETTINGS = [(6, None), (12, None), (1, None), (None, None), (None, 0.0), (None, 0.3)]


def qkv(b: int, h: int, n: int, d: int, *, scale: float = 1.0, dtype=F64, n_k: int | None = None):
    n_k = n if n_k is None else n_k
    q = torch.randn(b, h, n, d, dtype=dtype) * scale
    k = torch.randn(b, h, n_k, d, dtype=dtype) * scale
    v = torch.randn(b, h, n_k, d, dtype=dtype)
    return q, k, v


def lengths_mask(lengths: list[int], n: int) -> Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (b, n) right padding


class ZeroBias(LogitBias):
    def forward(self, q, q_positions, k_positions):
        return torch.zeros(1, q.shape[1], q.shape[2], k_positions.shape[-1])


def pair(*, d_model=32, heads=2, seed=0, **kwargs):
    """A NystromAttention and a SoftmaxAttention with the same projections (fp64)."""
    torch.manual_seed(seed)
    ny = NystromAttention(d_model, heads, **kwargs).to(F64).eval()
    sm = SoftmaxAttention(d_model, heads, positional=kwargs.get("positional")).to(F64).eval()
    sm.load_state_dict({k: v for k, v in ny.state_dict().items() if not k.startswith("conv")})
    return ny, sm


# -- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(1, 1), (7, 7), (7, 8), (10, 64), (33, 40)])
@pytest.mark.parametrize("factors", [False, True])
def test_exact_when_landmarks_cover_the_sequence(n, m, factors):
    q, k, v = qkv(2, 3, n, 8)
    mask = lengths_mask([n, max(1, n // 2)], n)
    ref, _ = explicit_softmax_attention(q, k, v, mask=mask[:, None, None, :])
    got = nystrom_attention(q, k, v, num_landmarks=m, key_padding_mask=mask,
                            query_padding_mask=mask, return_factors=factors)
    out = got[0] if factors else got
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if factors:
        torch.testing.assert_close(got[1].attention_matrix() @ v, ref, rtol=1e-12, atol=1e-12)


def test_short_sample_is_exact_inside_a_long_batch():
    n, m = 50, 12
    q, k, v = qkv(3, 2, n, 8)
    mask = lengths_mask([50, 12, 5], n)  # sample 0 approximate, samples 1 and 2 fit
    out, factors = nystrom_attention(q, k, v, num_landmarks=m, key_padding_mask=mask,
                                     query_padding_mask=mask, return_factors=True)
    ref, weights = explicit_softmax_attention(q, k, v, mask=mask[:, None, None, :])
    torch.testing.assert_close(out[1:], ref[1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factors.attention_matrix()[1:], weights[1:], rtol=1e-12,
                               atol=1e-12)
    assert (out[0] - ref[0]).abs().max() > 1e-3  # the long sample really is approximated


def test_module_is_softmax_attention_when_m_covers_n():
    ny, sm = pair(num_landmarks=16, conv_kernel=None)
    x = torch.randn(3, 16, 32, dtype=F64)
    mask = lengths_mask([16, 9, 1], 16)
    torch.testing.assert_close(ny(x, mask=mask), sm(x, mask=mask), rtol=1e-12, atol=1e-12)


def test_exact_pinv_converges_and_iterations_are_configurable():
    a = (torch.randn(2, 3, 16, 16, dtype=F64) * 2).softmax(-1)  # well-conditioned
    exact = torch.linalg.pinv(a)
    torch.testing.assert_close(iterative_pinv(a, 30), exact, rtol=1e-8, atol=1e-8)
    assert (iterative_pinv(a, 2) - exact).abs().max() > 1e-3  # truncation is visible
    q, k, v = qkv(1, 2, 40, 8)
    outs = [nystrom_attention(q, k, v, num_landmarks=8, pinv_iterations=i) for i in (1, 6, None)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_rows_of_s_hat_sum_to_one():
    q, k, v = qkv(2, 4, 300, 32, scale=0.5)
    _, factors = nystrom_attention(q, k, v, num_landmarks=16, return_factors=True)
    rows = factors.attention_matrix().sum(-1)  # (b, h, n)
    assert (rows - 1).abs().max() < 2e-3


@pytest.mark.parametrize("pinv_iterations,pinv_ridge", PINV_SETTINGS)
@pytest.mark.parametrize("longest", [12, 50])  # every sample fits / one sample is approximate
def test_exact_whatever_the_pinv_setting(pinv_iterations, pinv_ridge, longest):
    m, lengths = 12, [longest, 12, 7, 1]  # samples of different lengths, padded
    q, k, v = qkv(4, 2, longest, 8)
    mask = lengths_mask(lengths, longest)
    ref, weights = explicit_softmax_attention(q, k, v, mask=mask[:, None, None, :])
    for factors in (False, True):
        got = nystrom_attention(q, k, v, num_landmarks=m, key_padding_mask=mask,
                                query_padding_mask=mask, pinv_iterations=pinv_iterations,
                                pinv_ridge=pinv_ridge, return_factors=factors)
        out = got[0] if factors else got
        fits = slice(1, None) if longest > m else slice(None)
        torch.testing.assert_close(out[fits], ref[fits], rtol=1e-12, atol=1e-12)
        assert torch.isfinite(out).all()
        if factors:
            torch.testing.assert_close(got[1].attention_matrix()[fits], weights[fits],
                                       rtol=1e-12, atol=1e-12)
    if longest > m:
        assert (out[0] - ref[0]).abs().max() > 1e-3  # the long sample really is approximated


@pytest.mark.parametrize("pinv_iterations,pinv_ridge", PINV_SETTINGS)
def test_gradients_finite_for_every_pinv_setting(pinv_iterations, pinv_ridge):
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in qkv(4, 2, 40, 8, scale=2.0, dtype=torch.float32))
    mask = lengths_mask([40, 25, 3, 0], 40)  # approximate, approximate, exact, no keys
    out = nystrom_attention(q, k, v, num_landmarks=8, key_padding_mask=mask,
                            query_padding_mask=mask, pinv_iterations=pinv_iterations,
                            pinv_ridge=pinv_ridge)
    assert torch.isfinite(out).all() and out[3].abs().max() == 0
    (out * mask[:, None, :, None]).square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert q.grad[:2].abs().max() > 0


@pytest.mark.cpu_only
@given(st.integers(1, 24), st.integers(0, 2**16))
def test_regularized_pinv_equals_torch_pinv_on_well_conditioned_matrices(m, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, m, m, generator=g, dtype=F64) + 3 * m**0.5 * torch.eye(m, dtype=F64)
    assert torch.linalg.cond(a).max() < 10  # well-conditioned
    exact = torch.linalg.pinv(a, rtol=0.0)
    torch.testing.assert_close(regularized_pinv(a), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(regularized_pinv(a, rtol=1e-3), exact, rtol=1e-12, atol=1e-12)
    near = regularized_pinv(a, ridge=1e-7)  # the ridge path tends to the pinv as ridge -> 0
    torch.testing.assert_close(near, exact, rtol=1e-9, atol=1e-9)
    assert (regularized_pinv(a, ridge=0.3) - exact).abs().max() > 1e-4  # ridge is visible


def test_regularized_pinv_is_the_tikhonov_or_truncated_svd_filter():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(2, 6, 6, dtype=F64))
    w, _ = torch.linalg.qr(torch.randn(2, 6, 6, dtype=F64))
    sigma = torch.tensor([3.0, 1.0, 0.5, 0.05, 1e-3, 1e-6], dtype=F64)
    a = u * sigma @ w.mT  # A = U Σ Wᵀ, condition number 3e6
    lam = 0.1 * sigma[0]
    tikhonov = w * (sigma / (sigma**2 + lam**2)) @ u.mT
    torch.testing.assert_close(regularized_pinv(a, ridge=0.1), tikhonov, rtol=1e-9, atol=1e-9)
    truncated = w * torch.where(sigma > 0.1 * sigma[0], 1 / sigma, 0) @ u.mT
    torch.testing.assert_close(regularized_pinv(a, rtol=0.1), truncated, rtol=1e-9, atol=1e-9)
    for ridge in (0.0, 0.1):  # scale-equivariant: (cA)⁺ = A⁺ / c
        torch.testing.assert_close(regularized_pinv(1e3 * a, ridge=ridge),
                                   regularized_pinv(a, ridge=ridge) / 1e3, rtol=1e-6, atol=1e-9)


def test_regularized_pinv_keeps_masked_landmarks_out():
    a = torch.randn(2, 5, 5).softmax(-1)
    a[0, :, 3] = 0  # an empty key landmark: zero column
    a[0, 1, :] = 0  # an empty query landmark: zero row
    a[1] = 0  # a sample without keys
    for options in (dict(ridge=0.1), dict(ridge=1e-3), dict(), dict(rtol=0.1)):
        z = regularized_pinv(a, **options)
        assert torch.isfinite(z).all() and z[1].abs().max() == 0
        assert z[0, 3, :].abs().max() <= 1e-6 and z[0, :, 1].abs().max() <= 1e-6
    z = regularized_pinv(a, ridge=0.1)
    assert z[0, 3, :].abs().max() == 0 and z[0, :, 1].abs().max() == 0  # exactly, by the solve


def test_ridge_pinv_of_large_batched_matrices_with_threads():
    # batched LU solves failed here (MKL, 2 threads, m >= 256); the SPD system takes Cholesky
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = qkv(1, 8, 1024, 64, dtype=torch.float32)
        out = nystrom_attention(q, k, v, num_landmarks=256, pinv_iterations=None)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(out).all()


def test_gradcheck_ridge_pinv_fp64():
    a = (torch.randn(2, 5, 5, dtype=F64) * 2).softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: regularized_pinv(a, ridge=0.1), (a,),
                                    fast_mode=True)
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 11, 4, scale=0.7))
    mask = lengths_mask([11, 8], 11)

    def fn(q, k, v):
        return nystrom_attention(q, k, v, num_landmarks=3, key_padding_mask=mask,
                                 query_padding_mask=mask, pinv_iterations=None)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_ridge_beats_the_exact_pinv_on_an_ill_conditioned_kernel_2():
    # Peaky attention with segment means of 8 tokens: softmax(Q̃K̃ᵀ/√d) is close to a matrix of
    # low rank (condition number ~1e3-1e4), and its exact pinv amplifies the mismatch of
    # kernel_1 and kernel_3 along the small singular directions (error > 1: worse than zero).
    torch.manual_seed(0)
    q, k, v = qkv(1, 4, 512, 64, scale=2.0)
    ref, _ = explicit_softmax_attention(q, k, v)

    def error(**options):
        out = nystrom_attention(q, k, v, num_landmarks=64, **options)
        return float((out - ref).norm() / ref.norm())

    exact = error(pinv_iterations=None, pinv_ridge=0.0)
    ridge = error(pinv_iterations=None)
    assert exact > 3 and ridge < 1.1 and ridge < error(pinv_iterations=12)


def test_pinv_options_are_validated():
    with pytest.raises(ValueError, match="pinv_iterations=None"):
        nystrom_attention(*qkv(1, 1, 20, 4), num_landmarks=4, pinv_ridge=0.1)
    with pytest.raises(ValueError, match="pinv_iterations=None"):
        NystromAttention(16, 2, pinv_iterations=6, pinv_ridge=0.1)
    with pytest.raises(ValueError, match="pinv_ridge"):
        NystromAttention(16, 2, pinv_iterations=None, pinv_ridge=-0.1)
    with pytest.raises(TypeError, match="pinv_ridge"):
        NystromAttention(16, 2, pinv_iterations=None, pinv_ridge="0.1")
    with pytest.raises(ValueError, match="ridge or rtol"):
        regularized_pinv(torch.eye(3), ridge=0.1, rtol=0.1)
    with pytest.raises(ValueError, match="rtol"):
        regularized_pinv(torch.eye(3), rtol=1.5)
    model = NystromAttention(16, 2, pinv_iterations=None)
    assert model.pinv_ridge is None and "pinv_ridge=None" in repr(model)
    assert DEFAULT_PINV_RIDGE == 0.1
    from transformer_zoo.interop.hf_kernels import NystromKernel

    inner = NystromKernel(pinv_iterations=None, pinv_ridge=0.3).build(None, 2, 8)
    assert inner.pinv_iterations is None and inner.pinv_ridge == 0.3
    x = torch.randn(1, 30, 16)
    ridged = NystromAttention(16, 2, num_landmarks=4, pinv_iterations=None).eval()
    exact = NystromAttention(16, 2, num_landmarks=4, pinv_iterations=None, pinv_ridge=0.0).eval()
    exact.load_state_dict(ridged.state_dict())
    assert not torch.allclose(ridged(x), exact(x))  # the module passes pinv_ridge on


# -- independence and invariance ------------------------------------------------------------
def test_batch_elements_are_independent():
    q, k, v = qkv(4, 2, 90, 16, dtype=torch.float32)
    q[2] *= 30  # a wildly different sample must not move the others (global init would)
    batch = nystrom_attention(q, k, v, num_landmarks=8)
    for i in range(4):
        alone = nystrom_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], num_landmarks=8)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-6, atol=1e-6)


def test_pinv_init_is_per_matrix_unlike_nystrom_attention():
    peer = pytest.importorskip("nystrom_attention.nystrom_attention")
    a = torch.randn(2, 1, 8, 8, dtype=F64).softmax(-1)
    b = a.clone()
    b[1] = torch.eye(8, dtype=F64) * 0.9 + 0.1 / 8  # changing sample 1 ...
    torch.testing.assert_close(iterative_pinv(a, 3)[0], iterative_pinv(b, 3)[0])  # ... not 0
    assert (peer.moore_penrose_iter_pinv(a, 3)[0] - peer.moore_penrose_iter_pinv(b, 3)[0]
            ).abs().max() > 1e-6  # the peer's global max couples the samples


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance_module(side):
    torch.manual_seed(1)
    model = NystromAttention(32, 2, num_landmarks=6, conv_kernel=5).to(F64).eval()
    lengths, n = [37, 20, 4, 53], 53  # divisible or not by m, shorter than m, full
    x = torch.randn(len(lengths), n, 32, dtype=F64)
    mask = lengths_mask(lengths, n)
    if side == "left":
        mask = mask.flip(-1)
    out = model(x, mask=mask)
    for i in range(len(lengths)):
        keep = mask[i]
        alone = model(x[i:i + 1, keep])  # the unpadded sequence alone
        torch.testing.assert_close(out[i, keep], alone[0], rtol=1e-10, atol=1e-10)
        junk = x.clone()
        junk[i, ~keep] = 1e3 * torch.randn_like(junk[i, ~keep])  # garbage in the padding
        torch.testing.assert_close(model(junk, mask=mask)[i, keep], out[i, keep],
                                   rtol=1e-10, atol=1e-10)


def test_padded_keys_take_no_part_in_any_kernel():
    q, k, v = qkv(1, 2, 40, 8)
    mask = lengths_mask([29], 40)
    _, f = nystrom_attention(q, k, v, num_landmarks=5, key_padding_mask=mask,
                             query_padding_mask=mask, return_factors=True)
    assert f.kernel_3[..., 29:].abs().max() == 0  # (b, h, m, n_k) columns of padded keys
    k2, v2 = k.clone(), v.clone()
    k2[..., 29:, :], v2[..., 29:, :] = 1e4, -1e4
    q2 = q.clone()
    q2[..., 29:, :] = 1e4  # padded queries do not enter Q̃ either
    a = nystrom_attention(q, k, v, num_landmarks=5, key_padding_mask=mask,
                          query_padding_mask=mask)
    b = nystrom_attention(q2, k2, v2, num_landmarks=5, key_padding_mask=mask,
                          query_padding_mask=mask)
    torch.testing.assert_close(a[..., :29, :], b[..., :29, :], rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_give_zero_with_finite_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 30, 8))
    mask = lengths_mask([0, 30], 30)
    out = nystrom_attention(q, k, v, num_landmarks=4, key_padding_mask=mask,
                            query_padding_mask=mask)
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    model = NystromAttention(16, 2, num_landmarks=4).eval()
    y = model.attend(*(torch.randn(2, 2, 30, 8) for _ in range(3)), key_padding_mask=mask,
                     attn_mask=None, q_positions=torch.arange(30), k_positions=torch.arange(30))
    assert y[0].abs().max() == 0


# -- segmentation and shapes ----------------------------------------------------------------
@pytest.mark.cpu_only
@given(st.integers(1, 300), st.integers(1, 64), st.integers(0, 300))
def test_segments_hold_floor_or_ceil_of_valid_length(n, m, length):
    length = min(length, n)
    valid = torch.zeros(1, n, dtype=torch.bool)
    valid[0, torch.randperm(n)[:length]] = True  # arbitrary (non-contiguous) padding
    ids, counts = segment_ids(valid, 1, n, m, torch.device("cpu"))
    assert counts.sum() == length and (ids[~valid] == m).all()
    if length >= m:
        assert set(counts[0].tolist()) <= {length // m, -(-length // m)}
    else:
        assert counts.max() <= 1
    order = ids[0, valid[0]]
    assert (order[1:] >= order[:-1]).all()  # contiguous segments in token order


@given(st.integers(1, 2000), st.integers(1, 256), st.booleans())
def test_any_length_any_landmarks(n, m, padded):
    q, k, v = qkv(1, 1, n, 4, dtype=torch.float32)
    mask = lengths_mask([max(1, (2 * n) // 3)], n) if padded else None
    out = nystrom_attention(q, k, v, num_landmarks=m, key_padding_mask=mask,
                            query_padding_mask=mask, pinv_iterations=2)
    assert out.shape == (1, 1, n, 4) and torch.isfinite(out).all()


def test_factor_shapes_cross_attention_and_gqa():
    q = torch.randn(2, 4, 30, 8)
    k, v = torch.randn(2, 2, 45, 8), torch.randn(2, 2, 45, 6)  # GQA: 2 kv heads
    out, f = nystrom_attention(q, k, v, num_landmarks=7, return_factors=True)
    assert out.shape == (2, 4, 30, 6)
    assert f.kernel_1.shape == (2, 4, 30, 7) and f.z.shape == (2, 4, 7, 7)
    assert f.kernel_3.shape == (2, 4, 7, 45)
    expanded = v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(f.attention_matrix() @ expanded, out, rtol=1e-4, atol=1e-4)


@pytest.mark.cpu_only
def test_pinv_in_fp32_under_autocast():
    q, k, v = qkv(1, 2, 64, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, f = nystrom_attention(q, k, v, num_landmarks=8, return_factors=True)
        y = NystromAttention(32, 2, num_landmarks=8)(torch.randn(2, 40, 32))
    assert f.z.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(y).all()


def test_gradcheck_fp64():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 11, 4, scale=0.7))
    mask = lengths_mask([11, 8], 11)

    def fn(q, k, v):
        return nystrom_attention(q, k, v, num_landmarks=3, key_padding_mask=mask,
                                 query_padding_mask=mask, pinv_iterations=4)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    # a generic matrix: a softmax's rows all sum to 1, a tie where ‖A‖∞ has no derivative
    a = (torch.randn(1, 2, 5, 5, dtype=F64) + 3 * torch.eye(5, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: iterative_pinv(a, 3), (a,), fast_mode=True)
    model = NystromAttention(8, 2, num_landmarks=3, conv_kernel=3).to(F64)
    x = torch.randn(1, 9, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x), (x,), fast_mode=True)


# -- positional encodings and options -------------------------------------------------------
def test_rope_composes():
    rope = RotaryEmbedding(head_dim=16)
    ny, sm = pair(num_landmarks=24, conv_kernel=None, positional=rope)
    x = torch.randn(2, 20, 32, dtype=F64)
    torch.testing.assert_close(ny(x), sm(x), rtol=1e-12, atol=1e-12)  # m >= n: exact
    approx = NystromAttention(32, 2, num_landmarks=4, positional=rope).to(F64).eval()
    shifted = torch.arange(20) + 8  # RoPE is relative, and so is every landmark logit
    torch.testing.assert_close(approx(x), approx(x, positions=shifted), rtol=1e-5, atol=1e-5)
    assert (approx(x) - NystromAttention(32, 2, num_landmarks=4).to(F64).eval()(x)).abs().max()


def test_rejections_have_clear_messages():
    with pytest.raises(ValueError, match="causal"):
        NystromAttention(16, 2, causal=True)
    with pytest.raises(ValueError, match="odd"):
        NystromAttention(16, 2, conv_kernel=4)
    with pytest.raises(ValueError, match="NystromAttention cannot use ZeroBias"):
        NystromAttention(16, 2, positional=ZeroBias())
    with pytest.raises(ValueError, match="pinv_iterations"):
        NystromAttention(16, 2, pinv_iterations=-1)
    with pytest.raises(ValueError, match="num_landmarks"):
        NystromAttention(16, 2, num_landmarks=0)
    model = NystromAttention(16, 2, num_landmarks=4)
    x = torch.randn(1, 10, 16)
    with pytest.raises(ValueError, match="attn_mask"):
        model(x, attn_mask=torch.ones(10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="conv_kernel"):
        model(x, context=torch.randn(1, 12, 16))
    with pytest.raises(ValueError, match="query_padding_mask"):
        nystrom_attention(*qkv(1, 1, 5, 2), num_landmarks=2,
                          query_padding_mask=torch.ones(1, 4, dtype=torch.bool))


def test_cross_attention_and_encoder():
    model = NystromAttention(16, 2, num_landmarks=4, conv_kernel=None)
    out = model(torch.randn(2, 10, 16), context=torch.randn(2, 25, 16),
                mask=lengths_mask([25, 13], 25))
    assert out.shape == (2, 10, 16) and torch.isfinite(out).all()
    config = EncoderConfig(d_model=16, n_heads=2, n_layers=2,
                           attention=functools.partial(NystromAttention, num_landmarks=4))
    enc = Encoder(config).eval()
    x, mask = torch.randn(2, 30, 16), lengths_mask([30, 17], 30)
    y = enc(x, mask=mask)
    torch.testing.assert_close(y[1, :17], enc(x[1:, :17])[0], rtol=1e-5, atol=1e-5)


# -- agreement with Hugging Face on its domain ----------------------------------------------
@pytest.mark.parametrize("conv", [None, 5])
def test_agrees_with_hf_nystromformer(conv):
    hf_mod = pytest.importorskip("transformers.models.nystromformer.modeling_nystromformer")
    from transformers import NystromformerConfig

    d_model, n, m = 32, 64, 8
    # HF's init takes one max over the batch × heads tensor: one sample, one head is where
    # it coincides with the per-matrix init.
    config = NystromformerConfig(
        hidden_size=d_model, num_attention_heads=1, num_landmarks=m, segment_means_seq_len=n,
        conv_kernel_size=conv or 1, attention_probs_dropout_prob=0.0, inv_coeff_init_option=False,
    )
    hf = hf_mod.NystromformerSelfAttention(config).to(F64).eval()
    hf.conv_kernel_size = conv  # HF's config rejects None; its forward skips the conv on None
    ours = NystromAttention(d_model, 1, num_landmarks=m, conv_kernel=conv).to(F64).eval()
    with torch.no_grad():
        ours.q_proj.weight.copy_(hf.query.weight)
        ours.q_proj.bias.copy_(hf.query.bias)
        ours.kv_proj.weight.copy_(torch.cat([hf.key.weight, hf.value.weight]))
        ours.kv_proj.bias.copy_(torch.cat([hf.key.bias, hf.value.bias]))
        ours.out_proj.weight.copy_(torch.eye(d_model))  # HF's self-attention has no W^O
        ours.out_proj.bias.zero_()
        if conv is not None:
            ours.conv.weight.copy_(hf.conv.weight)
    x = torch.randn(1, n, d_model, dtype=F64)
    torch.testing.assert_close(ours(x), hf(x)[0], rtol=1e-10, atol=1e-10)


def test_scale_matches_softmax_convention():
    q, k, v = qkv(1, 1, 6, 9)
    a = nystrom_attention(q, k, v, num_landmarks=6, scale=0.5)
    b, _ = explicit_softmax_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, nystrom_attention(q, k, v, num_landmarks=6))


# -- the peers' defects, each caught by a property ours has -----------------------------------
def test_hf_mixes_batch_elements_off_its_configured_length_ours_does_not():
    hf_mod = pytest.importorskip("transformers.models.nystromformer.modeling_nystromformer")
    from transformers import NystromformerConfig

    config = NystromformerConfig(
        hidden_size=16, num_attention_heads=1, num_landmarks=4, segment_means_seq_len=64,
        conv_kernel_size=1, attention_probs_dropout_prob=0.0, inv_coeff_init_option=False,
    )
    hf = hf_mod.NystromformerSelfAttention(config).eval()
    hf.conv_kernel_size = None
    ours = NystromAttention(16, 1, num_landmarks=4, conv_kernel=None).eval()
    x = torch.randn(2, 32, 16)  # n = 32 != segment_means_seq_len = 64
    other = x.clone()
    other[1] = torch.randn(32, 16)  # change sample 1 only
    assert (hf(x)[0][0] - hf(other)[0][0]).abs().max() > 1e-3  # HF's sample 0 moves
    torch.testing.assert_close(ours(x)[0], ours(other)[0], rtol=0, atol=1e-6)


def test_nystrom_attention_is_not_padding_invariant_ours_is():
    peer = pytest.importorskip("nystrom_attention")
    theirs = peer.NystromAttention(16, dim_head=8, heads=2, num_landmarks=4, residual=False)
    ours = NystromAttention(16, 2, num_landmarks=4, conv_kernel=None)
    x, mask = torch.randn(1, 30, 16), lengths_mask([22], 30)
    gap_theirs = (theirs.eval()(x, mask=mask)[0, :22] - theirs(x[:, :22])[0]).abs().max()
    assert gap_theirs > 1e-3  # fixed-position segments: landmarks depend on the padding
    torch.testing.assert_close(ours.eval()(x, mask=mask)[0, :22], ours(x[:, :22])[0],
                               rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    model = NystromAttention(16, 2, num_landmarks=4, dropout=0.5)
    x = torch.randn(2, 30, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pinv_iterations"):
        iterative_pinv(torch.eye(3), -2)


def test_pinv_iteration_products_are_recomputed_not_saved(monkeypatch):
    """The iterative pseudoinverse's 4 (m × m) products per step are recomputed in backward
    (checkpointed), not saved: 6 steps at m = 256 and 8 heads would hold 48 MiB whatever n
    (issue 16's peak memory). Output and gradient are the truncated iteration's, as before."""
    import transformer_zoo.functional.nystrom as nystrom_module
    from transformer_zoo.functional.pinv import iterative_pinv

    m = 8
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 64, 4, scale=0.5))
    shapes: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        out = nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=6)
    square = [s for s in shapes if len(s) >= 2 and s[-2:] == (m, m)]
    assert len(square) <= 4, square  # kernel_2 and z around the pinv, not 24 products
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    monkeypatch.setattr(nystrom_module, "nystrom_pinv",
                        lambda a, it, ridge: iterative_pinv(a, it))  # products saved
    ref = nystrom_attention(*args, num_landmarks=m, pinv_iterations=6)
    want = torch.autograd.grad(ref.square().sum(), args)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
