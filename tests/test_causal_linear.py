"""causal_linear_scan: the per-feature-decay prefix sum against quadratic references."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import transformer_zoo.functional.causal_linear as cl
from transformer_zoo.functional import causal_linear_scan

F64 = torch.float64


# -- slow references written here -------------------------------------------------------------
def quadratic_scan(a, b, x, g, reverse=False):
    """Y_r = Σ_{s≤r} Σ_p a_rp b_sp e^{g_sp − g_rp} x_s (reverse: s ≥ r, e^{g_rp − g_sp}),
    the (n, n, P) decay formed explicitly, masked before exp."""
    g = g if g.ndim == a.ndim else g.unsqueeze(-1)
    n = a.shape[-2]
    diff = g[..., None, :, :] - g[..., :, None, :]  # [r, s, p] = g_s − g_r
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    if reverse:
        diff, keep = -diff, keep.T
    decay = diff.masked_fill(~keep[..., None], float("-inf")).exp()
    scores = torch.einsum("...rp,...sp,...rsp->...rs", a, b, decay.expand(*a.shape[:-2], n, n,
                                                                            a.shape[-1]))
    return scores @ x


def favor_like(n, p, q, spread, dtype=F64, seed=0, lead=(2, 3)):
    """Log-features with a spread of ``spread`` nats, stabilised as causal FAVOR does:
    a = e^{lq + g − max}, b = e^{lk − g}, g the running per-feature key max. Returns the
    scan inputs and the fp64 log-space truth Σ_{s≤r} Σ_p e^{lq_rp + lk_sp − M_r} x_s."""
    gen = torch.Generator().manual_seed(seed)
    lq = torch.randn(*lead, n, p, generator=gen, dtype=F64) * spread
    lk = torch.randn(*lead, n, p, generator=gen, dtype=F64) * spread
    lk = lk - torch.rand(*lead, n, 1, generator=gen, dtype=F64) * 4 * spread  # per-key norms
    lq, lk = lq.to(dtype).to(F64), lk.to(dtype).to(F64)  # log-features as the kernel has them
    x = torch.randn(*lead, n, q, generator=gen, dtype=F64)
    x[..., -1] = 1  # the last column is the denominator
    g = lk.cummax(-2).values
    top = (lq + g).amax(-1, keepdim=True)
    a, b = (lq + g - top).exp(), (lk - g).exp()
    terms = (lq[..., :, None, :] + lk[..., None, :, :] - top[..., None]).exp()  # [r, s, p] <= 1
    truth = terms.sum(-1).tril() @ x
    return [t.to(dtype) for t in (a, b, x, g)], truth


# -- values -----------------------------------------------------------------------------------
@pytest.mark.cpu_only
@settings(deadline=None, max_examples=60)
@given(n=st.integers(1, 40), chunk=st.integers(1, 16), per_feature=st.booleans(),
       jumps=st.booleans(), tiny_rise=st.booleans())
def test_scan_matches_quadratic(n, chunk, per_feature, jumps, tiny_rise):
    """Any chunk size, per-feature or scalar g, with steep rises (jumps of 500 nats, beyond
    fp64's max_rise) and with max_rise forced tiny so every level of the redo runs."""
    gen = torch.Generator().manual_seed(n * 100 + chunk)
    a, b = torch.rand(2, 2, n, 5, dtype=F64, generator=gen).unbind(0)
    x = torch.randn(2, n, 3, dtype=F64, generator=gen)
    steps = torch.rand(2, n, 5 if per_feature else 1, dtype=F64, generator=gen)
    if jumps:
        steps = steps + 500 * (torch.rand(steps.shape, generator=gen, dtype=F64) < 0.2)
    g = steps.cumsum(-2)
    want = quadratic_scan(a, b, x, g)
    original = cl.max_rise
    cl.max_rise = (lambda dtype: 0.3) if tiny_rise else original
    try:
        got = causal_linear_scan(a, b, x, g, chunk=chunk)
    finally:
        cl.max_rise = original
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.cpu_only
@pytest.mark.parametrize("spread", [1.0, 30.0, 300.0, 3000.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stabilised_features_are_exact_at_any_spread(spread, dtype):
    """FAVOR-style inputs whose log-features spread over thousands of nats: the denominator's
    largest term is exactly 1 and the output (numerator / denominator) matches the fp64
    log-space truth to the input dtype's rounding. A single running max over all features
    (the old stabiliser) gives 0 rows here."""
    (a, b, x, g), truth = favor_like(150, 16, 4, spread, dtype)
    got = causal_linear_scan(a, b, x, g, chunk=32).to(F64)
    eps = torch.finfo(dtype).eps
    assert (got[..., -1] >= 1 - 4 * eps).all()  # denominator >= its largest term, 1
    err = (got[..., :-1] / got[..., -1:] - truth[..., :-1] / truth[..., -1:]).abs().max()
    # exp of differences up to max_rise nats, each rounded: a few max_rise ulps at most
    assert err < (2 * cl.max_rise(dtype) + 100) * eps, err


@pytest.mark.cpu_only
def test_future_rows_never_change_past_outputs_bit_for_bit():
    """Scaling later keys' features by e^{±700} (so their g rises far past max_rise) or
    replacing their values leaves every earlier output bit-identical: each row's path
    (one reference, or redone in smaller chunks) depends on rows <= r only."""
    (a, b, x, g), _ = favor_like(96, 8, 3, 30.0, torch.float32, lead=(2,))
    base = causal_linear_scan(a, b, x, g, chunk=16)
    for cut in (5, 16, 40, 95):
        lk = (b.log() + g)[..., cut:, :] + 700 * torch.rand(2, 96 - cut, 8)
        g2 = torch.cat([g[..., :cut, :], torch.maximum(g[..., cut - 1 : cut, :],
                                                       lk.cummax(-2).values)], -2)
        b2 = torch.cat([b[..., :cut, :], (lk - g2[..., cut:, :]).exp()], -2)
        x2 = torch.cat([x[..., :cut, :], torch.randn(2, 96 - cut, 3) * 1e3], -2)
        moved = causal_linear_scan(a, b2, x2, g2, chunk=16)
        assert torch.equal(moved[..., :cut, :], base[..., :cut, :]), cut


@pytest.mark.cpu_only
def test_chunk_size_invariance_at_steep_rises():
    (a, b, x, g), truth = favor_like(200, 8, 3, 500.0, torch.float32, lead=(2,))
    outs = [causal_linear_scan(a, b, x, g, chunk=c).to(F64) for c in (1, 3, 16, 128, 256)]
    for out in outs:
        torch.testing.assert_close(out[..., :-1] / out[..., -1:],
                                   truth[..., :-1] / truth[..., -1:], rtol=1e-4, atol=1e-5)


@pytest.mark.cpu_only
def test_tiles_agree_with_one_tile(monkeypatch):
    (a, b, x, g), _ = favor_like(70, 6, 3, 100.0, F64)
    want = causal_linear_scan(a, b, x, g, chunk=4)
    monkeypatch.setattr(cl, "TILE_ELEMENTS", 1)  # one chunk of 4 rows per tile
    torch.testing.assert_close(causal_linear_scan(a, b, x, g, chunk=4), want, rtol=1e-12,
                               atol=1e-14)
    grads = [torch.autograd.grad(causal_linear_scan(*args, g, chunk=4).square().sum(), args)
             for args in [[t.clone().requires_grad_() for t in (a, b, x)]]]
    monkeypatch.setattr(cl, "TILE_ELEMENTS", 1 << 20)
    args = [t.clone().requires_grad_() for t in (a, b, x)]
    for got, want_grad in zip(grads[0], torch.autograd.grad(
            causal_linear_scan(*args, g, chunk=4).square().sum(), args), strict=True):
        torch.testing.assert_close(got, want_grad)


@pytest.mark.cpu_only
def test_wide_tiles_run_smaller_chunks_exactly(monkeypatch):
    """Where one chunk of rows holds more than TILE_ELEMENTS entries (wide features: FAVOR++'s
    512 at 8 heads), a tile is cut to fewer rows (not below MIN_TILE_ROWS) and the scan runs
    its chunks at that size: values and gradients equal the one-tile scan."""
    (a, b, x, g), _ = favor_like(150, 6, 3, 100.0, F64)  # lead (2, 3), P = 6
    args = [t.clone().requires_grad_() for t in (a, b, x)]
    want = causal_linear_scan(*args, g, chunk=64)
    want_grads = torch.autograd.grad(want.square().sum(), args)
    monkeypatch.setattr(cl, "MIN_TILE_ROWS", 8)
    monkeypatch.setattr(cl, "TILE_ELEMENTS", 2 * 3 * 6 * 10)  # ten rows' worth
    assert cl.tile_rows((2, 3), 6, 64) == 10
    assert cl.tile_rows((2, 3), 6, 4) == 8  # chunks that fit: whole chunks per tile
    monkeypatch.setattr(cl, "TILE_ELEMENTS", 1)
    assert cl.tile_rows((2, 3), 6, 64) == 8  # never below MIN_TILE_ROWS
    assert cl.tile_rows((2, 3), 6, 4) == 4  # nor above the chunk
    args = [t.clone().requires_grad_() for t in (a, b, x)]
    got = causal_linear_scan(*args, g, chunk=64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for got_grad, want_grad in zip(torch.autograd.grad(got.square().sum(), args), want_grads,
                                   strict=True):
        torch.testing.assert_close(got_grad, want_grad)


# -- gradients --------------------------------------------------------------------------------
@pytest.mark.cpu_only
@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("tiny_rise", [False, True])
def test_gradcheck_across_chunks(per_feature, tiny_rise, monkeypatch):
    if tiny_rise:  # every redo level in backward too (forward and reverse scans)
        monkeypatch.setattr(cl, "max_rise", lambda dtype: 0.3)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 2, 11, 4, dtype=F64, generator=gen).unbind(0)
    x = torch.randn(2, 11, 3, dtype=F64, generator=gen)
    g = torch.rand(2, 11, 4 if per_feature else 1, dtype=F64, generator=gen).cumsum(-2)
    args = [t.requires_grad_() for t in (a, b, x)]
    fn = functools.partial(causal_linear_scan, g=g, chunk=4)
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)  # create_graph=True


@pytest.mark.cpu_only
def test_gradients_equal_autograd_of_the_quadratic_reference():
    (a, b, x, g), _ = favor_like(37, 6, 3, 200.0, F64)
    args = [t.clone().requires_grad_() for t in (a, b, x)]
    ref = [t.clone().requires_grad_() for t in (a, b, x)]
    weight = torch.randn(2, 3, 37, 3, dtype=F64)
    got = torch.autograd.grad((causal_linear_scan(*args, g, chunk=8) * weight).sum(), args)
    want = torch.autograd.grad((quadratic_scan(*ref, g) * weight).sum(), ref)
    for gt, wt in zip(got, want, strict=True):
        torch.testing.assert_close(gt, wt, rtol=1e-9, atol=1e-12)


@pytest.mark.cpu_only
def test_custom_op_registration_passes_opcheck():
    """Fake (meta) kernel, autograd registration and schema agree with the eager kernel."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 2, 9, 4, dtype=F64, generator=gen).unbind(0)
    x = torch.randn(2, 9, 3, dtype=F64, generator=gen)
    g = torch.rand(2, 9, 4, dtype=F64, generator=gen).cumsum(-2)
    args = (a.requires_grad_(), b.requires_grad_(), x.requires_grad_(), g, 4)
    torch.library.opcheck(cl._scan_op, args)


def test_validation_names_the_problem():
    a = torch.rand(2, 5, 4)
    with pytest.raises(ValueError, match="chunk"):
        causal_linear_scan(a, a, a, a, chunk=0)
    with pytest.raises(ValueError, match=r"g \(\.\.\., n, P\|1\)"):
        causal_linear_scan(a, a, a, torch.zeros(2, 5, 3))
    torch.testing.assert_close(causal_linear_scan(a, a, a, torch.zeros(2, 5)),
                               causal_linear_scan(a, a, a, torch.zeros(2, 5, 1)))


@pytest.mark.cpu_only
@pytest.mark.parametrize("reverse", [False, True])
def test_sink_receives_every_tile_and_nothing_full_is_allocated(reverse, monkeypatch):
    """``scan_rows(..., sink=)``: each tile's rows (y and z) reach the sink exactly as the
    full outputs hold them, every row once, and no full output is returned."""
    (a, b, x, g), _ = favor_like(45, 6, 3, 100.0, F64)
    h = torch.randn(2, 3, 45, 3, dtype=F64)
    monkeypatch.setattr(cl, "TILE_ELEMENTS", 1)  # tiles of one 4-row chunk
    want_y, want_z = cl._scan(a, b, x, g, h, 4, reverse=reverse)
    got_y, got_z, seen = torch.zeros_like(want_y), torch.zeros_like(want_z), []

    def sink(index, sl, y, z):
        seen.append(index)
        got_y[..., sl, :], got_z[..., sl, :] = y, z

    assert cl.scan_rows(cl.Rows(a, b, g), x, h, 4, reverse=reverse, sink=sink) == (None, None)
    assert sorted(seen) == list(range(12)) and seen == sorted(seen, reverse=reverse)
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)
    torch.testing.assert_close(got_z, want_z, rtol=0, atol=0)
