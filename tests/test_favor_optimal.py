"""FAVOR++ (optimal positive random features): unbiasedness, optimal A, exact forms, padding."""

import math

import pytest
import torch

from transformer_zoo import OptimalPositiveFeatures, PerformerAttention
from transformer_zoo.functional import (
    PositiveFeatures,
    draw_projection,
    explicit_softmax_attention,
    favor_attention,
    favor_decode_step,
    gaussian_orthogonal_matrix,
)
from transformer_zoo.functional.feature_maps_optimal import mean_pair_rho, optimal_a

F64 = torch.float64


# -- slow references written here -------------------------------------------------------------
def textbook_oprf(x: torch.Tensor, w: torch.Tensor, a: float | torch.Tensor, antithetic: bool,
                  b_coef=None) -> torch.Tensor:
    """D exp(A|ω|² + B ωᵀx̂ − |x̂|²/2) / √F with every constant kept, x̂ = d^(-1/4) x."""
    d = x.shape[-1]
    xh = x * d**-0.25
    a = torch.as_tensor(a, dtype=x.dtype)
    b_coef = torch.sqrt(1 - 4 * a) if b_coef is None else torch.as_tensor(b_coef, dtype=x.dtype)
    ws = torch.cat([w, -w], -2) if antithetic else w
    logf = (a * ws.square().sum(-1).unsqueeze(-2) + b_coef * (xh @ ws.transpose(-2, -1))
            - xh.square().sum(-1, keepdim=True) / 2)
    return (1 - 4 * a) ** (d / 4) * logf.exp() / math.sqrt(ws.shape[-2])


def quadratic_oprf(q, k, v, w, a, antithetic, causal=False, valid=None):
    s = textbook_oprf(q, w, a, antithetic) @ textbook_oprf(k, w, a, antithetic).transpose(-2, -1)
    n, m = s.shape[-2:]
    keep = torch.ones(n, m, dtype=torch.bool)
    if causal:
        keep = torch.arange(m) <= torch.arange(n)[:, None] + (m - n)
    keep = keep if valid is None else keep & valid[:, None, None, :]
    s = s * keep
    return (s @ v) / s.sum(-1, keepdim=True)


def second_moment(a: float, x: torch.Tensor, y: torch.Tensor) -> float:
    """Closed form E[φ(x̂)²φ(ŷ)²] for one ω (module docstring), x̂, ŷ already scaled."""
    d = x.shape[-1]
    s = float((x + y).square().sum())
    norms = float(x.square().sum() + y.square().sum())
    return math.exp(d * math.log(1 - 4 * a) - d / 2 * math.log(1 - 8 * a)
                    + 2 * (1 - 4 * a) * s / (1 - 8 * a) - norms)


# -- the estimator ------------------------------------------------------------------------------
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("a", [0.0, -0.1, -0.4])
def test_estimator_is_unbiased_z_test(a, antithetic):
    torch.manual_seed(0)
    d = 16
    x = torch.zeros(d, dtype=F64)
    x[0] = 0.7 * d**0.25  # axis-aligned, as in the FAVOR+ test
    y = torch.randn(d, dtype=F64) * 0.3 * d**0.25
    w = gaussian_orthogonal_matrix(16, d, dtype=F64, draws=20000)  # (s, r, d)
    est = (textbook_oprf(x[None], w, a, antithetic) * textbook_oprf(y[None], w, a, antithetic))
    est = est.sum(-1).flatten()
    exact = math.exp(float((x * y).sum()) / math.sqrt(d))
    z = float((est.mean() - exact) / (est.std() / math.sqrt(len(est))))
    assert abs(z) < 3.5


def test_z_test_catches_a_missing_b_correction():
    """A ≠ 0 with B = 1 (forgetting B = √(1 − 4A)) is biased: the test above would see it."""
    torch.manual_seed(0)
    d = 16
    x = torch.zeros(d, dtype=F64)
    x[0] = 0.7 * d**0.25
    w = gaussian_orthogonal_matrix(16, d, dtype=F64, draws=20000)
    f = textbook_oprf(x[None], w, -0.2, False, b_coef=1.0)
    est = (f * f).sum(-1).flatten()
    exact = math.exp(float((x * x).sum()) / math.sqrt(d))
    assert float((est.mean() - exact) / (est.std() / math.sqrt(len(est)))) < -4


def test_optimal_a_minimises_the_closed_form_second_moment():
    torch.manual_seed(0)
    d = 16
    for scale in (0.2, 0.6, 1.0):
        x, y = torch.randn(2, d, dtype=F64) * scale
        rho = float((x + y).square().sum()) / d
        a_star = optimal_a(rho)
        assert a_star <= 0
        grid = [a_star + t for t in torch.linspace(-0.05, 0.05, 41).tolist() if a_star + t < 0.12]
        best = min(grid, key=lambda a: second_moment(a, x, y))
        assert abs(best - a_star) <= 0.0026  # the grid step
        assert second_moment(a_star, x, y) <= second_moment(0.0, x, y)


def test_closed_form_second_moment_matches_monte_carlo():
    torch.manual_seed(0)
    d = 8
    x, y = torch.randn(2, d, dtype=F64) * 0.15  # light tails: the Monte Carlo mean converges
    omega = torch.randn(400000, d, dtype=F64)
    sq = omega.square().sum(-1)

    def feature(z: torch.Tensor, a: float) -> torch.Tensor:
        return (1 - 4 * a) ** (d / 4) * torch.exp(
            a * sq + math.sqrt(1 - 4 * a) * omega @ z - z.square().sum() / 2)

    for a in (0.0, -0.15):
        mc = float((feature(x, a) * feature(y, a)).square().mean())
        assert mc == pytest.approx(second_moment(a, x, y), rel=0.03)


def test_rho_is_the_mean_over_real_pairs():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 5, dtype=F64), torch.randn(2, 3, 9, 5, dtype=F64)
    qm = torch.rand(2, 7) > 0.3
    km = torch.rand(2, 9) > 0.3
    qm[:, 0] = km[:, 0] = True
    rho = mean_pair_rho(q, k, qm, km)
    for b in range(2):
        pairs = (q[b][:, qm[b], None, :] + k[b][:, None, km[b], :]).square().sum(-1)  # (h, n', m')
        torch.testing.assert_close(rho[b, :, 0, 0], pairs.mean((-2, -1)) / 5)


def test_lower_error_than_favor_plus_at_equal_feature_count():
    """Unit-normal q, k × 0.5, d = 64: FAVOR++ (64 antithetic rows, F = 128) beats FAVOR+ (128)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 64) * s for s in (0.5, 0.5, 1.0))
    exact, _ = explicit_softmax_attention(q.double(), k.double(), v.double())
    plus = optimal = 0.0
    for step in range(6):
        w = draw_projection(128, 64, seed=1, step=step)
        plus += float((favor_attention(q, k, v, w) - exact).square().mean())
        w_half = draw_projection(64, 64, seed=1, step=step)
        out = favor_attention(q, k, v, w_half, feature_map=OptimalPositiveFeatures())
        optimal += float((out - exact).square().mean())
    assert optimal < 0.8 * plus, (optimal, plus)


# -- exact identities for a fixed W and A -------------------------------------------------------
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("lengths", [(12, 12), (5, 12)])
def test_linear_form_equals_quadratic_form_with_measured_rho(antithetic, lengths):
    torch.manual_seed(0)
    n, m = lengths
    q, k, v = (torch.randn(2, 3, t, 8, dtype=F64) * s for t, s in ((n, 1.5), (m, 1.5), (m, 1)))
    valid = torch.rand(2, m) > 0.3
    valid[:, 0] = True
    w = draw_projection(6, 8, seed=0, dtype=F64)
    fmap = OptimalPositiveFeatures(antithetic=antithetic)
    out = favor_attention(q, k, v, w, feature_map=fmap, key_padding_mask=valid)
    a = optimal_a(mean_pair_rho(q * 8**-0.25, k * 8**-0.25, None, valid))
    torch.testing.assert_close(out, quadratic_oprf(q, k, v, w, a, antithetic, valid=valid))


@pytest.mark.parametrize("lengths", [(12, 12), (5, 12), (12, 7)])
def test_causal_with_fixed_rho_equals_quadratic_form(lengths):
    torch.manual_seed(0)
    n, m = lengths
    q, k, v = (torch.randn(2, 3, t, 8, dtype=F64) for t in (n, m, m))
    w = draw_projection(6, 8, seed=0, dtype=F64)
    out = favor_attention(q, k, v, w, feature_map=OptimalPositiveFeatures(rho=0.4), causal=True,
                          chunk_size=4)
    ref = quadratic_oprf(q, k, v, w, optimal_a(0.4), True, causal=True)
    blind = max(n - m, 0)  # bottom-right aligned: the first n − m queries see no key -> 0
    torch.testing.assert_close(out[..., blind:, :], ref[..., blind:, :])
    assert not out[..., :blind, :].any()


def test_rho_zero_without_antithetic_is_favor_plus():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 10, 8, dtype=F64)
    w = draw_projection(16, 8, seed=0, dtype=F64)
    plus = favor_attention(q, k, v, w, feature_map=PositiveFeatures())
    zero = favor_attention(q, k, v, w, feature_map=OptimalPositiveFeatures(rho=0.0,
                                                                           antithetic=False))
    torch.testing.assert_close(zero, plus)


def test_padding_invariance_of_the_measured_rho():
    """Padded queries and keys (any content) move neither ρ nor the real outputs."""
    torch.manual_seed(0)
    attn = PerformerAttention(32, 4, nb_features=16, feature_map=OptimalPositiveFeatures(),
                              seed=0).double().eval()
    x = torch.randn(1, 9, 32, dtype=F64)
    padded = torch.cat([x, 50 * torch.randn(1, 5, 32, dtype=F64)], 1)
    mask = torch.arange(14)[None] < 9
    torch.testing.assert_close(attn(padded, mask=mask)[:, :9], attn(x), rtol=1e-10, atol=1e-12)


def test_causal_outputs_ignore_the_future_and_decode_matches():
    torch.manual_seed(0)
    fmap = OptimalPositiveFeatures(rho=0.3)
    q, k, v = torch.randn(3, 1, 2, 10, 8, dtype=F64)
    w = draw_projection(8, 8, seed=0, dtype=F64)
    out = favor_attention(q, k, v, w, feature_map=fmap, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[..., 6:, :] *= 6
    v2[..., 6:, :] += 3
    out2 = favor_attention(q, k2, v2, w, feature_map=fmap, causal=True)
    torch.testing.assert_close(out2[..., :6, :], out[..., :6, :], rtol=0, atol=1e-12)
    state, rows = None, []
    for i in range(10):
        row, state = favor_decode_step(q[..., i:i + 1, :], k[..., i:i + 1, :], v[..., i:i + 1, :],
                                       w, state, feature_map=fmap)
        rows.append(row)
    torch.testing.assert_close(torch.cat(rows, -2), out)


def test_causal_with_measured_rho_is_refused():
    with pytest.raises(ValueError, match="fixed rho"):
        PerformerAttention(16, 2, causal=True, feature_map=OptimalPositiveFeatures())
    PerformerAttention(16, 2, causal=True, feature_map=OptimalPositiveFeatures(rho=0.2))
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="fixed rho"):
        favor_attention(q, q, q, draw_projection(4, 8, seed=0),
                        feature_map=OptimalPositiveFeatures(), causal=True)


# -- gradients, stability, validation -----------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_with_fixed_rho(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=F64, requires_grad=True) for _ in range(3))
    w = draw_projection(4, 4, seed=0, dtype=F64)
    fmap = OptimalPositiveFeatures(rho=0.5)
    assert torch.autograd.gradcheck(
        lambda a, b, c: favor_attention(a, b, c, w, feature_map=fmap, causal=causal, chunk_size=4),
        (q, k, v),
    )


def test_measured_rho_is_a_stop_gradient():
    """The gradient with ρ measured equals the gradient with ρ frozen at the measured value."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=F64, requires_grad=True) for _ in range(3))
    w = draw_projection(4, 4, seed=0, dtype=F64)
    rho = float(mean_pair_rho(q * 4**-0.25, k * 4**-0.25, None, None))
    grads = []
    for fmap in (OptimalPositiveFeatures(), OptimalPositiveFeatures(rho=rho)):
        out = favor_attention(q, k, v, w, feature_map=fmap)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_overflow_at_large_norms_under_autocast(dtype):
    torch.manual_seed(0)
    attn = PerformerAttention(64, 4, nb_features=32, feature_map=OptimalPositiveFeatures(),
                              seed=0)
    with torch.no_grad():
        attn.q_proj.weight.mul_(40)
        attn.kv_proj.weight.mul_(40)
    x = torch.randn(2, 33, 64)
    with torch.autocast("cpu", dtype=dtype):
        out = attn(x)
    assert torch.isfinite(out).all()
    q = torch.randn(1, 2, 20, 16) * 30
    ones = favor_attention(q, q.flip(-2), torch.ones(1, 2, 20, 16),
                           draw_projection(16, 16, seed=0), feature_map=OptimalPositiveFeatures())
    torch.testing.assert_close(ones, torch.ones_like(ones))


@pytest.mark.parametrize("rho", [None, 0.2])
def test_compiles_fullgraph_and_matches_eager(rho):
    from torch._dynamo.testing import CompileCounter

    q, k, v = torch.randn(3, 2, 2, 6, 8).unbind(0)
    w = draw_projection(16, 8, seed=7)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    fmap = OptimalPositiveFeatures(rho=rho)
    for causal in (False, True) if rho is not None else (False,):
        def fn(q, k, v, causal=causal):
            return favor_attention(q, k, v, w, feature_map=fmap, key_padding_mask=mask,
                                   query_padding_mask=mask, causal=causal)

        counter = CompileCounter()
        compiled = torch.compile(fn, backend=counter, fullgraph=True)
        for _ in range(2):
            got = compiled(q, k, v)
        assert counter.frame_count == 1
        torch.testing.assert_close(got, fn(q, k, v), rtol=1e-6, atol=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="rho"):
        OptimalPositiveFeatures(rho=-0.1)
    with pytest.raises(ValueError, match="rho"):
        OptimalPositiveFeatures(rho=float("nan"))
    with pytest.raises(TypeError, match="rho"):
        OptimalPositiveFeatures(rho=True)
    with pytest.raises(TypeError, match="antithetic"):
        OptimalPositiveFeatures(antithetic=1)
    with pytest.raises(ValueError, match="prepared"):
        OptimalPositiveFeatures()(torch.randn(1, 1, 3, 4), torch.randn(4, 4), query=True)
    q = torch.randn(2, 1, 5, 4)
    with pytest.raises(ValueError, match="query_padding_mask"):
        favor_attention(q, q, q, draw_projection(4, 4, seed=0),
                        query_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    assert OptimalPositiveFeatures().num_features(8) == 16
    assert OptimalPositiveFeatures(antithetic=False).num_features(8) == 8


@pytest.mark.cpu_only
def test_measured_rho_ignores_padded_rows_of_any_content():
    """Padded keys holding 1e20 (or inf) must not reach ρ: mask before squaring."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(3))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, 4:] = False
    k_bad = k.clone()
    k_bad[0, :, 4:] = 1e20
    k_bad[0, :, 5, 0] = float("inf")
    rho_bad = mean_pair_rho(q, k_bad, None, valid)
    torch.testing.assert_close(rho_bad, mean_pair_rho(q, k, None, valid))
    torch.testing.assert_close(rho_bad[0], mean_pair_rho(q[:1], k[:1, :, :4], None, None)[0])
    w = draw_projection(8, 8, seed=0)
    out = favor_attention(q, k_bad, v, w, feature_map=OptimalPositiveFeatures(),
                          key_padding_mask=valid)
    want = favor_attention(q[:1], k[:1, :, :4], v[:1, :, :4], w,
                           feature_map=OptimalPositiveFeatures())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], want, rtol=1e-5, atol=1e-5)
