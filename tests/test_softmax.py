"""The softmax attention kernel against a slow reference written here, in fp64.

The reference walks every (batch, head, query) row: it collects the keys that row may attend
(mask AND bottom-right causal AND a bias above −inf), takes the softmax over exactly those
logits and returns 0 for a row with none. It shares no code with the package.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo.functional import (
    causal_mask,
    explicit_softmax_attention,
    merge_masks,
    padding_to_attn_mask,
    softmax_attention,
)
from transformer_zoo.functional.softmax import expand_kv_heads

F64 = torch.float64


def reference_attention(q, k, v, *, mask=None, bias=None, causal=False, scale=None):
    """Row by row: softmax over the allowed keys only; a row with none gives 0."""
    b, h, n, d = q.shape
    h_kv, m = k.shape[1], k.shape[2]
    group = h // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    allowed = torch.ones(b, h, n, m, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask.expand(b, h, n, m)
    bias_full = None if bias is None else bias.expand(b, h, n, m)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    weights = torch.zeros(b, h, n, m, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi // group], v[bi, hi // group]  # query head hi reads kv head hi//g
            for i in range(n):
                keys = [
                    j for j in range(m)
                    if allowed[bi, hi, i, j] and (not causal or j - (m - n) <= i)
                    and (bias_full is None or bias_full[bi, hi, i, j] > -math.inf)
                ]
                if not keys:
                    continue
                logits = torch.stack([
                    (q[bi, hi, i] @ kh[j]) * scale
                    + (0.0 if bias_full is None else bias_full[bi, hi, i, j])
                    for j in keys
                ])
                w = torch.exp(logits - logits.max())
                w = w / w.sum()
                for wj, j in zip(w, keys, strict=True):
                    out[bi, hi, i] += wj * vh[j]
                    weights[bi, hi, i, j] = wj
    return out, weights


@st.composite
def problems(draw, *, with_mask=True, with_bias=True):
    """A random attention problem: GQA heads, cross lengths, mask/bias shapes, causal."""
    b = draw(st.integers(1, 2))
    h_kv = draw(st.integers(1, 2))
    h = h_kv * draw(st.integers(1, 2))
    n, m = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    d, d_v = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, h, n, d, generator=g, dtype=F64)
    k = torch.randn(b, h_kv, m, d, generator=g, dtype=F64)
    v = torch.randn(b, h_kv, m, d_v, generator=g, dtype=F64)
    mask = bias = None
    if with_mask:
        shape = draw(st.sampled_from([None, (b, 1, 1, m), (b, h, n, m), (n, m), (1, h, 1, m),
                                      (), (m,), (h, 1, m)]))
        if shape is not None:
            mask = torch.rand(shape, generator=g) < 0.7
    if with_bias:
        shape = draw(st.sampled_from([None, (1, h, n, m), (b, 1, n, m), (n, m), (), (m,),
                                      (1, n, 1)]))
        if shape is not None:
            bias = 2 * torch.randn(shape, generator=g, dtype=F64)
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.3, 1.0]))
    return dict(q=q, k=k, v=v, mask=mask, bias=bias, causal=causal, scale=scale)


@pytest.mark.cpu_only
@given(problems())
def test_sdpa_path_equals_reference(p):
    out = softmax_attention(p["q"], p["k"], p["v"], mask=p["mask"], bias=p["bias"],
                            causal=p["causal"], scale=p["scale"])
    ref, _ = reference_attention(**p)
    assert out.shape == ref.shape == (*p["q"].shape[:3], p["v"].shape[-1])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.cpu_only
@given(problems())
def test_explicit_path_equals_reference(p):
    out, weights = explicit_softmax_attention(
        p["q"], p["k"], p["v"], mask=p["mask"], bias=p["bias"], causal=p["causal"],
        scale=p["scale"],
    )
    ref, ref_weights = reference_attention(**p)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)
    # every row of weights sums to 1, or to 0 when the row may attend nothing
    sums = weights.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-12) | (sums == 0))


@pytest.mark.cpu_only
@given(problems(with_mask=False, with_bias=False))
def test_fp32_close_to_fp64_reference(p):
    ref, _ = reference_attention(**p)
    q, k, v = (p[x].float() for x in "qkv")
    out = softmax_attention(q, k, v, causal=p["causal"], scale=p["scale"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


# Every rank 0..4 of mask and bias (trailing dims aligned, as torch broadcasts) for
# (b, h, n, m) = (2, 3, 4, 5); each is also compared with its explicitly expanded form.
B, H, N, M = 2, 3, 4, 5
SHAPES_BY_RANK = [
    [()],
    [(M,), (1,)],
    [(N, M), (1, M), (N, 1)],
    [(H, N, M), (1, 1, M), (H, 1, 1)],
    [(B, H, N, M), (B, 1, 1, M), (1, H, N, 1)],
]
ALL_SHAPES = [shape for shapes in SHAPES_BY_RANK for shape in shapes]


def _kernel(name):
    if name == "sdpa":
        return softmax_attention
    return lambda *a, **kw: explicit_softmax_attention(*a, **kw)[0]


def _broadcast_problem(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, 6, generator=g, dtype=F64)
    k, v = (torch.randn(B, H, M, 6, generator=g, dtype=F64) for _ in range(2))
    return g, q, k, v


@pytest.mark.cpu_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=str)
def test_mask_of_every_rank_broadcasts(shape, kernel, causal):
    g, q, k, v = _broadcast_problem(len(shape))
    f = _kernel(kernel)
    for trial in range(3):  # random, then all False (every row dead), then all True
        mask = torch.rand(shape, generator=g) < 0.6 if trial == 0 else torch.full(shape, trial == 2)
        out = f(q, k, v, mask=mask, causal=causal)
        ref, _ = reference_attention(q, k, v, mask=mask, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        expanded = f(q, k, v, mask=mask.expand(B, H, N, M).contiguous(), causal=causal)
        torch.testing.assert_close(out, expanded, rtol=1e-12, atol=1e-12)
        if trial == 1:
            assert torch.equal(out, torch.zeros_like(out))  # fully masked rows give 0


@pytest.mark.cpu_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=str)
def test_bias_of_every_rank_broadcasts(shape, kernel, causal):
    g, q, k, v = _broadcast_problem(10 + len(shape))
    f = _kernel(kernel)
    bias = 2 * torch.randn(shape, generator=g, dtype=F64)
    mask = torch.rand(B, 1, N, M, generator=g) < 0.7
    for m_ in (None, mask):
        out = f(q, k, v, bias=bias, mask=m_, causal=causal)
        ref, _ = reference_attention(q, k, v, bias=bias, mask=m_, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        expanded = f(q, k, v, bias=bias.expand(B, H, N, M).contiguous(), mask=m_,
                     causal=causal)
        torch.testing.assert_close(out, expanded, rtol=1e-12, atol=1e-12)


@pytest.mark.cpu_only
@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_low_rank_mask_and_bias_together_with_gradients(kernel):
    """A (m,) mask with a 0-d bias: one dead key column, gradients finite and equal to the
    expanded problem's."""
    _, q, k, v = _broadcast_problem(7)
    f = _kernel(kernel)
    mask = torch.tensor([True, False, True, True, False])
    grads = []
    for m_, b_ in ((mask, torch.tensor(0.5, dtype=F64)),
                   (mask.expand(B, H, N, M), torch.full((B, H, N, M), 0.5, dtype=F64))):
        qq = q.clone().requires_grad_()
        out = f(qq, k, v, mask=m_, bias=b_)
        out.square().sum().backward()
        grads.append((out, qq.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(grads[0][1]).all()


def test_causal_mask_is_bottom_right_aligned():
    for n, m in [(1, 1), (3, 3), (2, 5), (5, 2), (1, 4)]:
        want = torch.tensor([[j <= i + (m - n) for j in range(m)] for i in range(n)])
        assert torch.equal(causal_mask(n, m), want)


@pytest.mark.cpu_only
@given(st.integers(1, 6), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_causal_cross_lengths_equal_last_rows_of_full_causal(n, extra, seed):
    """Queries that are the last n of m tokens see what those rows see in full self-attention."""
    m = n + extra
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, m, 4, generator=g, dtype=F64) for _ in range(3))
    full = softmax_attention(q, k, v, causal=True)
    tail = softmax_attention(q[:, :, m - n:], k, v, causal=True)
    torch.testing.assert_close(tail, full[:, :, m - n:], rtol=1e-12, atol=1e-12)


def test_causal_more_queries_than_keys_zeroes_leading_rows():
    q = torch.randn(1, 1, 5, 4, dtype=F64)
    k, v = torch.randn(1, 1, 2, 4, dtype=F64), torch.randn(1, 1, 2, 3, dtype=F64)
    out = softmax_attention(q, k, v, causal=True)
    assert torch.equal(out[:, :, :3], torch.zeros(1, 1, 3, 3, dtype=F64))
    assert out[:, :, 3:].abs().sum() > 0


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_fully_masked_rows_are_zero_with_finite_gradients(with_bias, kernel):
    q = torch.randn(2, 2, 4, 8, dtype=F64, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, dtype=F64, requires_grad=True)
    v = torch.randn(2, 2, 6, 5, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 2, 4, 6, dtype=F64, requires_grad=True) if with_bias else None
    mask = torch.rand(2, 2, 4, 6) < 0.6
    mask[0, 1, 2] = False  # one dead row
    mask[1] = False  # a whole sample with nothing to attend
    if kernel == "sdpa":
        out = softmax_attention(q, k, v, mask=mask, bias=bias)
    else:
        out, _ = explicit_softmax_attention(q, k, v, mask=mask, bias=bias)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1, 2], torch.zeros(5, dtype=F64))
    assert torch.equal(out[1], torch.zeros(2, 4, 5, dtype=F64))
    out.square().sum().backward()
    for t in (q, k, v) + ((bias,) if with_bias else ()):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 1, 2], torch.zeros(8, dtype=F64))  # dead row: no gradient
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def _dead_row_problem():
    """Rows whose every logit is −inf, through the bias alone, the mask alone, or both."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 5, 4, generator=g, dtype=F64)
    k = torch.randn(2, 2, 6, 4, generator=g, dtype=F64)
    v = torch.randn(2, 2, 6, 3, generator=g, dtype=F64)
    bias = torch.randn(2, 2, 5, 6, generator=g, dtype=F64)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    bias[0, 0, 1] = -math.inf  # bias alone kills the row
    bias[0, 1, 2, :3] = -math.inf  # partly −inf: a live row over keys 3..5
    mask[1, 0, 3] = False  # mask alone kills the row (both heads)
    mask[1, 0, 4, 3:] = False  # mixed: the mask leaves keys 0..2 ...
    bias[1, 1, 4, :3] = -math.inf  # ... and head 1's bias kills exactly those
    bias[1, 0, 0] = -math.inf  # and a −inf bias row under a partly open mask
    mask[1, 0, 0, ::2] = False
    dead = [(0, 0, 1), (1, 0, 3), (1, 1, 3), (1, 1, 4), (1, 0, 0)]
    return q, k, v, bias, mask, dead


@pytest.mark.cpu_only
@pytest.mark.parametrize("with_mask", [False, True])
def test_minus_inf_bias_rows_give_zero_in_both_kernels(with_mask):
    q, k, v, bias, mask, dead = _dead_row_problem()
    if not with_mask:
        mask = None
        dead = [(0, 0, 1), (1, 0, 0)]
    ref, ref_w = reference_attention(q, k, v, mask=mask, bias=bias)
    sdpa = softmax_attention(q, k, v, mask=mask, bias=bias)
    out, weights = explicit_softmax_attention(q, k, v, mask=mask, bias=bias)
    for got in (sdpa, out, weights):
        assert torch.isfinite(got).all()
    torch.testing.assert_close(sdpa, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights, ref_w, rtol=1e-10, atol=1e-12)
    for row in dead:
        assert torch.equal(out[row], torch.zeros(3, dtype=F64))
        assert torch.equal(sdpa[row], torch.zeros(3, dtype=F64))
        assert torch.equal(weights[row], torch.zeros(6, dtype=F64))
    sums = weights.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-12) | (sums == 0))
    assert (sums == 0).sum() == len(dead)


@pytest.mark.cpu_only
@pytest.mark.parametrize("kernel", ["sdpa", "explicit", "weights"])
def test_minus_inf_bias_rows_have_finite_zero_gradients(kernel):
    q, k, v, bias, mask, dead = _dead_row_problem()
    q, k, v, bias = (t.clone().requires_grad_() for t in (q, k, v, bias))
    if kernel == "sdpa":
        out = softmax_attention(q, k, v, mask=mask, bias=bias)
    else:
        out, weights = explicit_softmax_attention(q, k, v, mask=mask, bias=bias)
        out = weights if kernel == "weights" else out
    out.square().sum().backward()
    for t in (q, k, bias) if kernel == "weights" else (q, k, v, bias):  # weights: v unused
        assert torch.isfinite(t.grad).all()
    for row in dead:
        assert torch.equal(q.grad[row], torch.zeros(4, dtype=F64))
        assert torch.equal(bias.grad[row], torch.zeros(6, dtype=F64))

    def f(q, k, v):
        if kernel == "sdpa":
            return softmax_attention(q, k, v, mask=mask, bias=bias.detach())
        return explicit_softmax_attention(q, k, v, mask=mask, bias=bias.detach())

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_finite_minimum_bias_row_averages_its_values(dtype):
    """``finfo.min`` is finite: unlike −inf it leaves the row live (HF eager behaviour)."""
    q, k, v = torch.randn(1, 2, 3, 4, dtype=dtype), *torch.randn(2, 1, 2, 5, 4, dtype=dtype)
    bias = torch.zeros(1, 2, 3, 5, dtype=dtype)
    bias[0, 1, 2] = torch.finfo(dtype).min
    out, weights = explicit_softmax_attention(q, k, v, bias=bias)
    for got in (out, softmax_attention(q, k, v, bias=bias)):
        torch.testing.assert_close(got[0, 1, 2], v[0, 1].mean(0))
    torch.testing.assert_close(weights[0, 1, 2], torch.full((5,), 0.2, dtype=dtype))


@pytest.mark.cpu_only
def test_gradcheck_kernel_mask_bias_causal_gqa():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 4, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(1, 2, 5, 3, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 4, 3, 5, generator=g, dtype=F64, requires_grad=True)
    mask = torch.rand(1, 1, 3, 5, generator=g) < 0.7
    mask[0, 0, 0] = False  # a fully masked row, gradient must stay finite (0)

    def sdpa(q, k, v, bias):
        return softmax_attention(q, k, v, mask=mask, bias=bias, causal=True)

    def explicit(q, k, v, bias):
        return explicit_softmax_attention(q, k, v, mask=mask, bias=bias, causal=True)[0]

    assert torch.autograd.gradcheck(sdpa, (q, k, v, bias))
    assert torch.autograd.gradcheck(explicit, (q, k, v, bias))


def test_gqa_equals_repeated_heads():
    q = torch.randn(2, 6, 4, 8, dtype=F64)
    k, v = torch.randn(2, 2, 7, 8, dtype=F64), torch.randn(2, 2, 7, 8, dtype=F64)
    k_full, v_full = expand_kv_heads(k, v, 6)
    assert k_full.shape == (2, 6, 7, 8)
    assert torch.equal(k_full[:, 0], k[:, 0]) and torch.equal(k_full[:, 2], k[:, 0])
    assert torch.equal(k_full[:, 3], k[:, 1])
    torch.testing.assert_close(softmax_attention(q, k, v), softmax_attention(q, k_full, v_full))


def test_seq_one_attends_to_itself():
    q, k, v = (torch.randn(3, 2, 1, 4, dtype=F64) for _ in range(3))
    torch.testing.assert_close(softmax_attention(q, k, v, causal=True), v)


def test_dropout_only_changes_output_when_asked():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    plain = softmax_attention(q, k, v)
    assert not torch.allclose(softmax_attention(q, k, v, dropout_p=0.5), plain)
    out, weights = explicit_softmax_attention(q, k, v, dropout_p=0.5, training=False)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    dropped, weights2 = explicit_softmax_attention(q, k, v, dropout_p=0.5, training=True)
    assert not torch.allclose(dropped, plain)
    torch.testing.assert_close(weights2, weights)  # weights are returned before dropout


def test_mask_helpers():
    kpm = torch.tensor([[True, False, True]])
    assert padding_to_attn_mask(kpm).shape == (1, 1, 1, 3)
    a = torch.tensor([[True, True], [False, True]])
    b = torch.tensor([[True, False], [True, True]])
    assert merge_masks() is None and merge_masks(None, None) is None
    assert merge_masks(None, a) is a
    assert torch.equal(merge_masks(a, None, b), a & b)


def test_mask_equals_minus_infinity_bias():
    """A boolean mask is the same as a -inf additive bias on the masked logits."""
    q, k, v = (torch.randn(2, 2, 4, 4, dtype=F64) for _ in range(3))
    mask = torch.rand(2, 2, 4, 4) < 0.6
    mask[..., 0] = True  # no dead rows here
    as_bias = torch.zeros(2, 2, 4, 4, dtype=F64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(softmax_attention(q, k, v, mask=mask),
                               softmax_attention(q, k, v, bias=as_bias))
