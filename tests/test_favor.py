"""FAVOR+ kernels: random matrix, feature maps, linear vs quadratic form, causal prefix sum."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo.functional import (
    FavorState,
    GeneralizedFeatures,
    HyperbolicFeatures,
    OptimalPositiveFeatures,
    PositiveFeatures,
    RowNorms,
    draw_projection,
    explicit_softmax_attention,
    favor_attention,
    favor_decode_step,
    gaussian_orthogonal_matrix,
)
from transformer_zoo.functional.favor import compute_dtype
from transformer_zoo.functional.favor import log_features as favor_log_features
from transformer_zoo.functional.random_features import projection_seed

F64 = torch.float64


# -- slow references written here -------------------------------------------------------------
def textbook_features(x: torch.Tensor, w: torch.Tensor, fmap) -> torch.Tensor:
    """φ(x̂) exactly as in the paper (no stabilizer), x̂ = d^(-1/4) x."""
    xh = x * x.shape[-1] ** -0.25
    proj = xh @ w.transpose(-2, -1)
    if isinstance(fmap, GeneralizedFeatures):
        return fmap.fn(proj)
    sq = (xh * xh).sum(-1, keepdim=True) / 2
    if isinstance(fmap, HyperbolicFeatures):
        return torch.cat([(proj - sq).exp(), (-proj - sq).exp()], -1) / math.sqrt(2 * w.shape[-2])
    return (proj - sq).exp() / math.sqrt(w.shape[-2])


def quadratic_favor(q, k, v, w, fmap, causal=False, valid=None):
    """D⁻¹ (Q'K'ᵀ ⊙ M) V with the textbook features, fully materialised."""
    a = textbook_features(q, w, fmap) @ textbook_features(k, w, fmap).transpose(-2, -1)
    n, m = a.shape[-2:]
    keep = torch.ones(n, m, dtype=torch.bool)
    if causal:
        keep = torch.arange(m) <= torch.arange(n)[:, None] + (m - n)
    keep = keep if valid is None else keep & valid[:, None, None, :]
    a = a * keep
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v) / den.clamp_min(1e-300), 0.0)


def rand_qkv(b=2, h=3, n=12, m=12, d=8, dtype=F64, scale=1.0):
    q = torch.randn(b, h, n, d, dtype=dtype) * scale
    k = torch.randn(b, h, m, d, dtype=dtype) * scale
    return q, k, torch.randn(b, h, m, d, dtype=dtype)


# -- random matrix ----------------------------------------------------------------------------
def test_blocks_are_orthogonal_with_sqrt_d_norms_and_truncated_tail():
    w = gaussian_orthogonal_matrix(20, 8, row_norms=RowNorms.SQRT_D, dtype=F64)
    assert w.shape == (20, 8)
    for blk in (w[:8], w[8:16], w[16:]):
        gram = blk @ blk.T
        torch.testing.assert_close(gram, 8 * torch.eye(len(blk), dtype=F64))


def test_chi_norms_are_independent_of_the_directions():
    w = gaussian_orthogonal_matrix(16, 16, dtype=F64, draws=400)
    u = w / w.norm(dim=-1, keepdim=True)
    eye = torch.eye(16, dtype=F64).expand(400, 16, 16)
    torch.testing.assert_close(u @ u.transpose(-2, -1), eye)
    norms = w.norm(dim=-1)
    assert norms.std() > 0.3  # not all √d
    assert abs(norms.square().mean() - 16) < 0.5  # E[chi²(d)] = d


def test_sign_fix_makes_rows_isotropic():
    """Without Q·diag(sign R_ii) LAPACK's QR gives row 0 a first coordinate that is always < 0."""
    w = gaussian_orthogonal_matrix(8, 8, dtype=F64, draws=2000)
    frac = (w[:, 0, 0] > 0).double().mean()
    assert abs(frac - 0.5) < 0.05
    q, _ = torch.linalg.qr(torch.randn(2000, 8, 8, dtype=F64))  # peers: no sign fix
    assert abs((q.transpose(-2, -1)[:, 0, 0] > 0).double().mean() - 0.5) > 0.4


def _z_score(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, fmap) -> float:
    est = (textbook_features(x, w, fmap) * textbook_features(y, w, fmap)).sum(-1).flatten()
    exact = math.exp(float((x * y).sum()) / math.sqrt(x.shape[-1]))
    return float((est.mean() - exact) / (est.std() / math.sqrt(len(est))))


@pytest.mark.parametrize("fmap", [PositiveFeatures(), HyperbolicFeatures()], ids=repr)
@pytest.mark.parametrize("aligned", [True, False])
def test_estimator_is_unbiased_z_test(fmap, aligned):
    d = 16
    x = torch.zeros(d, dtype=F64)
    if aligned:
        x[0] = 0.7 * d**0.25
        y = x.clone()
    else:
        x, y = torch.randn(2, d, dtype=F64) * 0.2 * d**0.25
    w = gaussian_orthogonal_matrix(16, d, dtype=F64, draws=20000)  # (s, r, d)
    assert abs(_z_score(w, x[None], y[None], fmap)) < 3.5


def test_z_test_catches_a_matrix_without_the_sign_fix():
    d = 16
    x = torch.zeros(d, dtype=F64)
    x[0] = 0.7 * d**0.25
    q, _ = torch.linalg.qr(torch.randn(20000, d, d, dtype=F64))  # the peers' recipe
    w = torch.randn(20000, d, d, dtype=F64).norm(dim=-1, keepdim=True) * q.transpose(-2, -1)
    assert _z_score(w, x[None], x[None], PositiveFeatures()) < -4


def test_draw_is_deterministic_in_seed_step_layer():
    a = draw_projection(32, 8, seed=3, step=2, layer=1)
    torch.testing.assert_close(a, draw_projection(32, 8, seed=3, step=2, layer=1), rtol=0, atol=0)
    for other in ((4, 2, 1), (3, 3, 1), (3, 2, 0)):
        s, t, layer = other
        assert not torch.equal(a, draw_projection(32, 8, seed=s, step=t, layer=layer))
    assert projection_seed(3, 2, 1) == projection_seed(3, 2, 1) < 2**63
    with pytest.raises(TypeError, match="step"):
        projection_seed(1, 1.5, 0)


# -- approximation quality --------------------------------------------------------------------
def _mse(r: int, orthogonal: bool, draws: int, q, k, v) -> float:
    exact, _ = explicit_softmax_attention(q, k, v)
    w = gaussian_orthogonal_matrix(r, q.shape[-1], orthogonal=orthogonal, dtype=F64, draws=draws)
    errs = [(favor_attention(q, k, v, w[i]) - exact).square().mean() for i in range(draws)]
    return float(torch.stack(errs).mean())


@pytest.mark.slow
def test_mse_falls_like_one_over_m_and_orthogonal_beats_iid():
    q, k, v = rand_qkv(1, 4, 32, 32, 16, scale=0.4)
    ms = [16, 64, 256, 1024]
    mse = [_mse(r, True, 12, q, k, v) for r in ms]
    x, y = torch.log(torch.tensor(ms, dtype=F64)), torch.log(torch.tensor(mse, dtype=F64))
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert -1.2 < slope < -0.8, (mse, slope)
    ortho = sum(_mse(r, True, 12, q, k, v) for r in (16, 64, 256))
    iid = sum(_mse(r, False, 12, q, k, v) for r in (16, 64, 256))
    assert ortho < iid


# -- exact identities for a fixed W -------------------------------------------------------------
FMAPS = [PositiveFeatures(), HyperbolicFeatures(), GeneralizedFeatures()]


@pytest.mark.parametrize("fmap", FMAPS, ids=repr)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(12, 12), (5, 12), (12, 7)])
def test_linear_form_equals_quadratic_form(fmap, causal, lengths):
    n, m = lengths
    q, k, v = rand_qkv(n=n, m=m, scale=1.5)
    valid = torch.rand(2, m) > 0.3
    valid[:, 0] = True
    w = draw_projection(24, 8, seed=0, dtype=F64)
    got = favor_attention(q, k, v, w, feature_map=fmap, causal=causal, key_padding_mask=valid,
                          chunk_size=5)
    want = quadratic_favor(q, k, v, w, fmap, causal, valid)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_grouped_query_heads_match_expanded():
    q, k, v = rand_qkv(h=4)
    k2, v2 = k[:, :2], v[:, :2]
    w = draw_projection(16, 8, seed=1, dtype=F64)
    got = favor_attention(q, k2, v2, w, causal=True)
    k4, v4 = k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1)
    want = favor_attention(q, k4, v4, w, causal=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmap", [PositiveFeatures(), HyperbolicFeatures()], ids=repr)
def test_favor_gradcheck(causal, fmap):
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 2, 7, 7, 4))
    valid = torch.tensor([[True, True, False, True, True, True, False]])
    w = draw_projection(6, 4, seed=0, dtype=F64)

    def fn(q, k, v):
        return favor_attention(q, k, v, w, feature_map=fmap, causal=causal, key_padding_mask=valid,
                               chunk_size=3)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_causal_memory_is_linear_in_n():
    """Autograd keeps O(n(F + d)) for causal FAVOR+, not a b·h·n·F·d prefix-sum tensor."""
    n, r, d = 512, 64, 16
    q, k, v = (t.float().requires_grad_() for t in rand_qkv(1, 2, n, n, d))
    w = draw_projection(r, d, seed=0)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        favor_attention(q, k, v, w, causal=True, chunk_size=64).sum().backward()
    assert sum(saved) < 12 * 2 * n * (r + d)  # a few (b, h, n, F|d) tensors
    assert max(saved) <= 2 * n * (r + d + 1)  # far below b·h·n·F·d = 2·512·64·16
    assert q.grad is not None and torch.isfinite(q.grad).all()


# -- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmap", FMAPS, ids=repr)
def test_recurrent_steps_equal_parallel_causal(fmap):
    q, k, v = rand_qkv(n=9, m=9, scale=2.0)
    k[:, :, 4] *= 6  # a large key mid-sequence moves the running stabilizer
    w = draw_projection(16, 8, seed=2, dtype=F64)
    want = favor_attention(q, k, v, w, feature_map=fmap, causal=True, chunk_size=4)
    state: FavorState | None = None
    for t in range(9):
        sl = slice(t, t + 1)
        out, state = favor_decode_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], w, state,
                                       feature_map=fmap)
        torch.testing.assert_close(out, want[:, :, sl], rtol=1e-10, atol=1e-12)
    assert state.length == 9 and state.numerator.shape == (2, 3, fmap.num_features(16), 8)


def test_decode_step_rejects_more_than_one_token():
    q, k, v = rand_qkv(n=2, m=2)
    with pytest.raises(ValueError, match="one token"):
        favor_decode_step(q, k, v, draw_projection(8, 8, seed=0, dtype=F64))


# -- the fused bidirectional path -----------------------------------------------------------------
class Unfused:
    """Same map without its fused form: the generic autograd path (features formed by the
    map, then the linear form or the scan) instead of the fused kernels."""

    def fused_affine(self, w):
        return None


class UnfusedPositive(Unfused, PositiveFeatures):
    pass


class UnfusedHyperbolic(Unfused, HyperbolicFeatures):
    pass


class UnfusedOptimal(Unfused, OptimalPositiveFeatures):
    def prepare(self, *args, **kwargs):
        prepared = super().prepare(*args, **kwargs)
        copy = UnfusedOptimal(rho=prepared.rho, antithetic=prepared.antithetic)
        copy._rho_tensor = prepared._rho_tensor
        return copy


FUSED_PAIRS = [
    (PositiveFeatures(), UnfusedPositive()),
    (HyperbolicFeatures(), UnfusedHyperbolic()),
    (OptimalPositiveFeatures(), UnfusedOptimal()),
    (OptimalPositiveFeatures(rho=0.3, antithetic=False),
     UnfusedOptimal(rho=0.3, antithetic=False)),
]


def force_tiles(monkeypatch) -> None:
    """Tiles of 16 rows, recomputed in backward: the online key max, its rescaling and the
    tile seams are exercised at test sizes."""
    import transformer_zoo.functional.favor_fused as fused_module

    monkeypatch.setattr(fused_module, "TILE_ELEMENTS", 1)
    monkeypatch.setattr(fused_module, "KEEP_ELEMENTS", 0)


@pytest.mark.parametrize("pair", FUSED_PAIRS, ids=lambda p: repr(p[0]))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tiled", [False, True], ids=["one-tile", "16-row-tiles"])
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_fused_path_matches_generic_values_and_gradients(pair, padded, tiled, precision,
                                                         monkeypatch):
    """Fused == generic. Under set_float32_matmul_precision("high") the fused kernel adds
    |k̂|²/2 and c + 2β after the matmuls (TF32 would round them): the same function too."""
    import transformer_zoo.functional.favor as favor_module

    calls = []
    fused_apply = favor_module.FusedFavor.apply
    monkeypatch.setattr(favor_module.FusedFavor, "apply",
                        lambda *a: calls.append(1) or fused_apply(*a))
    n, m = (40, 45) if tiled else (10, 13)
    if tiled:
        force_tiles(monkeypatch)
    q, k, v = (t.requires_grad_() for t in rand_qkv(2, 3, n, m, 8, scale=2.0))
    if tiled:  # the largest keys in the last tile: the running max must rescale the sum
        k.data[:, :, -5:] *= 3.0
    valid = torch.rand(2, m) > 0.3 if padded else None
    q_valid = torch.rand(2, n) > 0.3 if padded else None
    if padded and tiled:
        valid[1, :20] = False  # a whole tile (and more) of padded keys for one sample
    w = draw_projection(24, 8, seed=4, dtype=F64)
    outs, grads = [], []
    before = torch.get_float32_matmul_precision()
    for fmap, fmap_precision in ((pair[0], precision), (pair[1], before)):
        torch.set_float32_matmul_precision(fmap_precision)
        try:
            out = favor_attention(q, k, v, w, feature_map=fmap, key_padding_mask=valid,
                                  query_padding_mask=q_valid)
            outs.append(out)
            grads.append(torch.autograd.grad((out * torch.arange(8.0)).sum(), (q, k, v)))
        finally:
            torch.set_float32_matmul_precision(before)
    assert len(calls) == 1  # the first map took the fused path, its subclass did not
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cpu_only
@pytest.mark.parametrize("tiled", [False, True], ids=["one-tile", "16-row-tiles"])
def test_fused_path_value_width_may_differ_from_head_dim(tiled, monkeypatch):
    """v (b, h, m, d_v) with d_v != d: the fused kernel's K'ᵀ[V, 1] is (F, d_v + 1)."""
    if tiled:
        force_tiles(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(1, 2, n, 8, generator=gen, dtype=F64).requires_grad_() for n in (40, 45))
    v = torch.randn(1, 2, 45, 5, generator=gen, dtype=F64).requires_grad_()
    w = draw_projection(16, 8, seed=1, dtype=F64)
    got = favor_attention(q, k, v, w)
    want = favor_attention(q, k, v, w, feature_map=UnfusedPositive())
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)),
                    torch.autograd.grad(want.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fmap", [PositiveFeatures(), UnfusedPositive(), HyperbolicFeatures()],
                         ids=repr)
def test_bidirectional_denominator_never_underflows_at_extreme_norms(fmap):
    """Per-feature key max + query compensation: the largest denominator term is exactly 1.

    Queries along +u, keys along -u, |x̂| = 20: a single key-side max (over all features)
    leaves every φ(q)ᵀφ(k) below e^-100 (fp32 gives 0/0); ours stays exact.
    """
    u = torch.randn(16, dtype=F64)
    u = u / u.norm()
    q = 40 * u + 3 * torch.randn(1, 2, 16, 16, dtype=F64)
    k = -40 * u + 3 * torch.randn(1, 2, 16, 16, dtype=F64)
    v = torch.randn(1, 2, 16, 16, dtype=F64)
    w = draw_projection(64, 16, seed=0, dtype=F64)
    want = quadratic_favor(q, k, v, w, fmap)  # fp64 textbook features still representable
    got = favor_attention(q.float(), k.float(), v.float(), w.float(), feature_map=fmap)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmap", FMAPS, ids=repr)
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_rows_give_zero_and_finite_gradients(fmap, causal):
    q, k, v = (t.requires_grad_() for t in rand_qkv(2, 2, 6, 6, 8))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1] = False
    w = draw_projection(8, 8, seed=0, dtype=F64)
    out = favor_attention(q, k, v, w, feature_map=fmap, causal=causal, key_padding_mask=valid)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@given(n=st.integers(2, 30), cut=st.integers(1, 29), chunk=st.integers(1, 9))
def test_causal_prefix_consistency(n, cut, chunk):
    """The first `cut` outputs do not depend on anything after them (any chunking)."""
    cut = min(cut, n)
    q, k, v = rand_qkv(1, 2, n, n, 8, scale=2.0)
    w = draw_projection(16, 8, seed=0, dtype=F64)
    full = favor_attention(q, k, v, w, causal=True, chunk_size=chunk)
    part = favor_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], w, causal=True,
                           chunk_size=chunk)
    torch.testing.assert_close(full[:, :, :cut], part)


def test_bidirectional_is_key_permutation_invariant_and_query_equivariant():
    q, k, v = rand_qkv(2, 2, 9, 11, 8, scale=1.5)
    w = draw_projection(16, 8, seed=0, dtype=F64)
    out = favor_attention(q, k, v, w)
    pk, pq = torch.randperm(11), torch.randperm(9)
    torch.testing.assert_close(favor_attention(q, k[:, :, pk], v[:, :, pk], w), out)
    torch.testing.assert_close(favor_attention(q[:, :, pq], k, v, w), out[:, :, pq])


def test_fused_path_learnable_projection_gets_its_gradient():
    """A W that requires grad takes the generic path: ∂W equals the unfused map's."""
    q, k, v = rand_qkv(1, 2, 9, 11, 8)
    w = draw_projection(16, 8, seed=2, dtype=F64).requires_grad_()
    grads = []
    for fmap in (PositiveFeatures(), UnfusedPositive()):
        out = favor_attention(q, k, v, w, feature_map=fmap)
        grads.append(torch.autograd.grad((out * out).sum(), w)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("pair", FUSED_PAIRS[:3], ids=lambda p: repr(p[0]))
def test_fused_path_second_order_gradients_match_generic(pair):
    """create_graph=True through the fused Function: a gradient penalty's gradient is exact."""
    q, k, v = (t.requires_grad_() for t in rand_qkv(2, 3, 9, 11, 8, scale=2.0))
    valid = torch.rand(2, 11) > 0.3
    w = draw_projection(12, 8, seed=2, dtype=F64)
    grads = []
    for fmap in pair:
        out = favor_attention(q, k, v, w, feature_map=fmap, key_padding_mask=valid)
        gq, gk = torch.autograd.grad((out * out).sum(), (q, k), create_graph=True)
        grads.append(torch.autograd.grad(gq.square().sum() + gk.sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# -- causal exactness at every norm (issue: per-feature running key max) ----------------------
def textbook_log_features(x, w, fmap):
    """log φ(x̂) in fp64 up to constants (r^(-1/2), D), written from the papers: FAVOR+ and
    hyperbolic (Choromanski et al. 2021), FAVOR++ with A = A*(ρ), B = √(1 − 4A)
    (Likhosherstov et al. 2022)."""
    xh = x.to(F64) * x.shape[-1] ** -0.25
    w = w.to(F64)
    sq = xh.square().sum(-1, keepdim=True) / 2
    if isinstance(fmap, OptimalPositiveFeatures):
        rho = fmap.rho
        a = (1 - 2 * rho - math.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16
        wf = torch.cat([w, -w]) if fmap.antithetic else w
        return math.sqrt(1 - 4 * a) * (xh @ wf.T) + a * wf.square().sum(-1) - sq
    proj = xh @ w.T
    if isinstance(fmap, HyperbolicFeatures):
        proj = torch.cat([proj, -proj], -1)
    return proj - sq


def lse_reference(lq, lk, v, causal=True, valid=None):
    """out_i = Σ_j softmax_j(L_ij) v_j with L_ij = logsumexp_f(lq_if + lk_jf), in fp64: the
    quadratic form D⁻¹(Q'K'ᵀ ⊙ M)V computed in log space (no under/overflow at any norm)."""
    lq, lk = lq.to(F64), lk.to(F64)
    big = lq[..., :, None, :] + lk[..., None, :, :]  # (b, h, n, m, F)
    logits = torch.logsumexp(big, -1)
    n, m = logits.shape[-2:]
    keep = torch.ones(n, m, dtype=torch.bool)
    if causal:
        keep = torch.arange(m) <= torch.arange(n)[:, None] + (m - n)
    keep = keep if valid is None else keep & valid[:, None, None, :]
    logits = logits.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)  # rows without a key: 0
    return weights @ v.to(F64)


def gaussian_qkv(norm, n=64, m=64, d=64, seed=0, dtype=torch.float32):
    """q, k ~ N(0, σ²) per coordinate with σ√d = ``norm`` (the typical per-head norm)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, d, generator=gen, dtype=F64) * norm / math.sqrt(d)
    k = torch.randn(1, 2, m, d, generator=gen, dtype=F64) * norm / math.sqrt(d)
    v = torch.randn(1, 2, m, d, generator=gen, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


NORMS = [1, 3, 10, 30, 100, 300]
CAUSAL_MAPS = [PositiveFeatures(), HyperbolicFeatures(),
               OptimalPositiveFeatures(rho=0.5, antithetic=True)]


@pytest.mark.cpu_only
@pytest.mark.parametrize("fmap", CAUSAL_MAPS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_causal_matches_fp64_logsumexp_reference_at_every_norm(fmap, dtype):
    """Causal FAVOR vs the fp64 log-space quadratic form over per-head norms 1..300.

    Against the truth from the same (rounded) inputs the error grows only with the fp32
    rounding of the log-features themselves (|log φ| reaches ~6000 at norm 300: an absolute
    error ~ε·|log φ| in every logit), as the bidirectional path's does. The old single
    running max gave all-zero rows from norm ~100 on (error 1)."""
    w = draw_projection(128, 64, seed=0)
    out_eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0  # output cast
    for norm in NORMS:
        q, k, v = gaussian_qkv(norm, dtype=dtype, seed=norm)
        got = favor_attention(q, k, v, w, feature_map=fmap, causal=True, chunk_size=16)
        got = got.to(F64)
        scale = v.abs().max().double()
        lq, lk = textbook_log_features(q, w, fmap), textbook_log_features(k, w, fmap)
        err = float((got - lse_reference(lq, lk, v)).abs().max() / scale)
        assert (got.abs().sum(-1) > 0).all(), f"norm {norm}: zero rows"
        # conditioning: fp32 log-features carry an absolute error ~ε·|log φ| (6000 at 300)
        cond = torch.finfo(torch.float32).eps * float(lq.abs().max() + lk.abs().max())
        assert err <= 4 * cond + 2e-5 + out_eps, (norm, err, cond)
        qz, kz = favor_log_features(q.to(compute_dtype(dtype)), k.to(compute_dtype(dtype)), w,
                                    feature_map=fmap, causal=True)
        own = lse_reference(qz, kz, v)  # the stabilisers round log φ(q) + g in fp32 only
        assert float((got - own).abs().max() / scale) <= 2 * cond + 1e-5 + out_eps, norm


@pytest.mark.cpu_only
def test_causal_single_query_and_key_give_v_exactly():
    """One query, one key: the output is v whatever the directions (the issue's case:
    q = −50u, k = 50u, d = 64, r = 256 gave 0 for 5 of 20 directions u)."""
    d = 64
    w = draw_projection(256, d, seed=0)
    for seed in range(20):
        u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
        u = u / u.norm()
        q, k = (-50 * u).view(1, 1, 1, d), (50 * u).view(1, 1, 1, d)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ones = torch.ones(1, 1, 1, d, dtype=dtype)
            args = (q.to(dtype), k.to(dtype), ones, w)
            assert torch.equal(favor_attention(*args, causal=True), ones), (seed, dtype)
            assert torch.equal(favor_decode_step(*args)[0], ones), (seed, dtype)
        v = torch.randn(1, 1, 1, d)
        torch.testing.assert_close(favor_attention(q, k, v, w, causal=True), v, rtol=3e-7,
                                   atol=0)


@pytest.mark.cpu_only
@pytest.mark.parametrize("norm", [10, 300])
@pytest.mark.parametrize("chunk", [8, 128])
def test_future_keys_never_change_past_outputs_bit_for_bit(norm, chunk):
    """Scaling future keys by 1e3, zeroing them (a small-norm key raises the running max by
    thousands of nats: the steep-rise path) or randomising them and their values leaves
    every earlier output bit-identical."""
    q, k, v = gaussian_qkv(norm, n=96, m=96)
    w = draw_projection(64, 64, seed=1)
    base = favor_attention(q, k, v, w, causal=True, chunk_size=chunk)
    for cut in (1, 7, 40, 95):
        for change in ("scale", "zero", "random"):
            k2, v2 = k.clone(), v.clone()
            if change == "scale":
                k2[:, :, cut:] *= 1e3
            elif change == "zero":
                k2[:, :, cut:] = 0
            else:
                k2[:, :, cut:] = torch.randn_like(k2[:, :, cut:]) * norm
            v2[:, :, cut:] = torch.randn_like(v2[:, :, cut:]) * 1e3
            moved = favor_attention(q, k2, v2, w, causal=True, chunk_size=chunk)
            assert torch.equal(moved[:, :, :cut], base[:, :, :cut]), (cut, change)


@pytest.mark.cpu_only
@pytest.mark.parametrize("norm", [3, 300])
def test_causal_is_chunk_size_invariant(norm):
    q, k, v = gaussian_qkv(norm, n=100, m=100)
    w = draw_projection(64, 64, seed=2)
    want = favor_attention(q, k, v, w, causal=True, chunk_size=100)
    for chunk in (1, 3, 16, 64, 128):
        torch.testing.assert_close(favor_attention(q, k, v, w, causal=True, chunk_size=chunk),
                                   want, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu_only
@pytest.mark.parametrize("fmap", [*CAUSAL_MAPS, GeneralizedFeatures()], ids=repr)
@pytest.mark.parametrize("norm", [3, 300])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_decode_steps_equal_parallel_at_every_norm(fmap, norm, dtype):
    """The state carries the per-feature running max: step t equals row t of the parallel
    causal kernel (and the fp64 log-space truth) at norm 300, where every output of the old
    scalar stabiliser was 0."""
    norm = 3 if isinstance(fmap, GeneralizedFeatures) else norm  # ReLU features: no exp
    q, k, v = gaussian_qkv(norm, n=24, m=24, dtype=dtype)
    w = draw_projection(32, 64, seed=3, dtype=dtype)
    want = favor_attention(q, k, v, w, feature_map=fmap, causal=True, chunk_size=8)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
    state = None
    for t in range(24):
        sl = slice(t, t + 1)
        out, state = favor_decode_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], w, state,
                                       feature_map=fmap)
        torch.testing.assert_close(out, want[:, :, sl], **tol)
    assert state.g.shape == (1, 2, 1 if not fmap.exponential else fmap.num_features(32))
    assert (want.abs().sum(-1) > 0).all()


@pytest.mark.cpu_only
@pytest.mark.parametrize("lengths", [(24, 40), (40, 24)])
def test_cross_lengths_align_bottom_right_at_large_norms(lengths):
    """n != m: query i sees keys j <= i + m − n, and takes the running max of exactly those
    keys; padded keys (any content) leave everything unchanged."""
    n, m = lengths
    q, k, v = gaussian_qkv(300, n=n, m=m)
    valid = torch.rand(1, m, generator=torch.Generator().manual_seed(0)) > 0.3
    k[:, :, ~valid[0]] = 0  # padded keys that would dominate the running max
    w = draw_projection(64, 64, seed=4)
    got = favor_attention(q, k, v, w, causal=True, key_padding_mask=valid, chunk_size=8)
    qz, kz = favor_log_features(q, k, w, causal=True)
    want = lse_reference(qz, kz, v, valid=valid)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu_only
@pytest.mark.parametrize("causal", [False, True])
def test_numerator_transform_keeps_the_scalar_stabiliser_documented_limit(causal):
    """Su's numerator-only form mixes features, so its key max is one scalar (it commutes with
    any linear map of the features). Exact at per-head norm 30; at 300 some rows underflow
    to 0 (the documented limitation, bidirectional and causal alike)."""
    w = draw_projection(128, 64, seed=0)

    def identity(qf, kf):  # a numerator transform that changes nothing but the stabiliser
        return qf, kf

    for norm, exact in ((30, True), (300, False)):
        q, k, v = gaussian_qkv(norm, seed=1)
        got = favor_attention(q, k, v, w, causal=causal, numerator_transform=identity)
        want = lse_reference(*favor_log_features(q, k, w, causal=causal), v, causal=causal)
        if exact:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        else:
            assert (got.abs().sum(-1) == 0).any()
            plain = favor_attention(q, k, v, w, causal=causal)  # per-feature: exact
            torch.testing.assert_close(plain.double(), want, rtol=5e-4, atol=5e-4)


def test_causal_gradcheck_with_a_learnable_projection():
    """The fused causal kernel returns ∂log φ(q), ∂log φ(k): W gets its gradient through them
    (padding and a steep rise included)."""
    q, k, v = rand_qkv(1, 2, 9, 9, 4)
    k[:, :, 5] *= 0  # a small-norm key: the running max jumps
    valid = torch.tensor([[True, True, False, True, True, True, False, True, True]])
    w = draw_projection(6, 4, seed=0, dtype=F64)
    args = tuple(t.requires_grad_() for t in (q, k, v, w))

    def fn(q, k, v, w):
        return favor_attention(q * 6, k * 6, v, w, causal=True, key_padding_mask=valid,
                               chunk_size=4)

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("tiled", [False, True], ids=["one-tile", "16-row-tiles"])
def test_fused_backward_saves_the_inputs_and_small_summaries_not_the_output(tiled, monkeypatch):
    """Bidirectional fused FAVOR+: beyond q, k, v, autograd holds 1/den (n per head), the key
    summary K'ᵀ[V, 1] and W (O(F·d)) — and, as one tile, the features it keeps — but not
    the b·h·n·d output, which backward recomputes per tile from φ(q) (issue 16: the module's
    peak memory). Gradients stay equal to the generic path's."""
    import transformer_zoo.functional.favor as favor_module

    if tiled:
        force_tiles(monkeypatch)
    b, h, n, d, r = 1, 2, 64, 8, 4
    q, k, v = (t.requires_grad_() for t in rand_qkv(b, h, n, n, d, scale=1.0))
    w = draw_projection(r, d, seed=0)
    inputs = {t.data_ptr() for t in (q, k, v)}
    saved: list[tuple[int, ...]] = []

    def pack(t):
        if t.data_ptr() not in inputs:
            saved.append(tuple(t.shape))
        return t

    calls = []
    fused_apply = favor_module.FusedFavor.apply
    monkeypatch.setattr(favor_module.FusedFavor, "apply",
                        lambda *a: calls.append(1) or fused_apply(*a))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = favor_attention(q, k, v, w)
    assert calls and (b, h, n, d) not in saved, saved
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    args = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = favor_attention(*args, w.double(), feature_map=UnfusedPositive())
    want = torch.autograd.grad(ref.square().sum(), args)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
