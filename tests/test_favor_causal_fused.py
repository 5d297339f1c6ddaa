"""Causal FAVOR+ tiled end to end (favor_causal_fused.py): values, gradients, memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import transformer_zoo.functional.causal_linear as cl
import transformer_zoo.functional.favor as favor_module
import transformer_zoo.functional.favor_causal_fused as fused
from transformer_zoo.functional import (
    HyperbolicFeatures,
    OptimalPositiveFeatures,
    PositiveFeatures,
    draw_projection,
    favor_attention,
)

F64 = torch.float64


class Unfused:
    """The same map without its fused form: features formed by the map, then the scan."""

    def fused_affine(self, w):
        return None


class UnfusedPositive(Unfused, PositiveFeatures):
    pass


class UnfusedHyperbolic(Unfused, HyperbolicFeatures):
    pass


class UnfusedOptimal(Unfused, OptimalPositiveFeatures):
    pass


PAIRS = [
    (PositiveFeatures(), UnfusedPositive()),
    (HyperbolicFeatures(), UnfusedHyperbolic()),
    (OptimalPositiveFeatures(rho=0.3), UnfusedOptimal(rho=0.3)),
    (OptimalPositiveFeatures(rho=0.7, antithetic=False),
     UnfusedOptimal(rho=0.7, antithetic=False)),
]


def qkv(n, m, d=8, b=2, h=3, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=F64) * scale
    k = torch.randn(b, h, m, d, generator=gen, dtype=F64) * scale
    k[:, :, m // 2] *= 6  # a large key mid-sequence: the running max jumps
    k[:, :, m // 3] = 0  # after it, a small one: g rises by nothing, its features fall
    return q, k, torch.randn(b, h, m, d, generator=gen, dtype=F64)


def small_tiles(monkeypatch) -> None:
    """One chunk per tile: the carried running max and the tile seams at test sizes."""
    monkeypatch.setattr(cl, "TILE_ELEMENTS", 1)


def lse_reference(q, k, v, w_f, b_coef, beta, valid):
    """out_i = Σ_{j≤i} softmax_j(logsumexp_f(log φ(q̂_i)_f + log φ(k̂_j)_f)) v_j in fp64, written
    from the affine form (no stabiliser, no scan): values and autograd gradients."""
    xq, xk = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25
    lq = (xq @ w_f.transpose(-2, -1)) * b_coef + beta
    lk = (xk @ w_f.transpose(-2, -1)) * b_coef + beta - xk.square().sum(-1, keepdim=True) / 2
    logits = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], -1)
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool).tril() & valid[:, None, None, :]
    weights = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.cpu_only
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: repr(p[0]))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lengths", [(37, 37), (30, 41), (41, 30)])
def test_tiled_equals_untiled_generic_values_and_gradients(pair, padded, lengths, monkeypatch):
    """fp64: the tiled kernel (features formed per tile, recomputed in backward) equals the
    generic path (the map's features in full, then the scan), outputs and ∂q, ∂k, ∂v, ∂W."""
    calls = []
    op = favor_module.causal_favor_affine
    monkeypatch.setattr(favor_module, "causal_favor_affine",
                        lambda *a, **kw: calls.append(1) or op(*a, **kw))
    small_tiles(monkeypatch)
    n, m = lengths
    q, k, v = qkv(n, m)
    valid = None
    if padded:
        valid = torch.rand(2, m, generator=torch.Generator().manual_seed(1)) > 0.3
        valid[1, :12] = False  # the first tiles of one sample hold no key
        k[~valid[:, None, :].expand_as(k[..., 0])] = 1e3  # padded content never counts
    w = draw_projection(12, 8, seed=3, dtype=F64)
    outs, grads = [], []
    for fmap in pair:
        args = [t.clone().requires_grad_() for t in (q, k, v, w)]
        out = favor_attention(*args[:3], args[3], feature_map=fmap, causal=True,
                              key_padding_mask=valid, chunk_size=8)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.arange(8.0, dtype=F64)).sum(), args))
    assert len(calls) == 1  # the fused map took the tiled kernel, its twin the generic path
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for got, want in zip(*grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.cpu_only
def test_tiles_equal_one_tile(monkeypatch):
    q, k, v = qkv(50, 50, seed=2, scale=6.0)  # large norms: steep rises, redone rows
    w = draw_projection(16, 8, seed=0, dtype=F64)
    results = []
    for tiny in (False, True):
        if tiny:
            small_tiles(monkeypatch)
        args = [t.clone().requires_grad_() for t in (q, k, v, w)]
        out = favor_attention(*args, causal=True, chunk_size=4)
        results.append((out, torch.autograd.grad(out.square().sum(), args)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def affine_inputs(n=13, d=4, f=6, h=2, seed=0):
    """Per-head W_F (h, F, d), B (1, h, 1, 1) and β (1, h, 1, F), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, d, generator=gen, dtype=F64) * 2 for _ in range(3))
    w_f = torch.randn(h, f, d, generator=gen, dtype=F64)
    b_coef = 0.5 + torch.rand(1, h, 1, 1, generator=gen, dtype=F64)
    beta = torch.randn(1, h, 1, f, generator=gen, dtype=F64)
    valid = torch.rand(2, n, generator=gen) > 0.3
    valid[0, :4] = False
    valid[1, 0] = True
    return [t.requires_grad_() for t in (q, k, v, w_f, b_coef, beta)], valid


@pytest.mark.cpu_only
def test_values_and_gradients_equal_the_log_space_quadratic_form(monkeypatch):
    """Per-head W_F, B and β: output and the gradients to all six inputs equal autograd of
    the fp64 log-sum-exp quadratic form (a reference with no stabiliser and no scan)."""
    small_tiles(monkeypatch)
    args, valid = affine_inputs()
    got = fused.causal_favor_affine(*args, valid, chunk=4)
    want = lse_reference(*args, valid)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    for a, b in zip(torch.autograd.grad((got * weight).sum(), args),
                    torch.autograd.grad((want * weight).sum(), args), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.cpu_only
def test_gradcheck_and_double_backward(monkeypatch):
    small_tiles(monkeypatch)
    args, valid = affine_inputs(n=9, f=4)

    def fn(*a):
        return fused.causal_favor_affine(*a, valid, chunk=3)

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)  # create_graph=True


@pytest.mark.cpu_only
def test_custom_op_registration_passes_opcheck():
    args, valid = affine_inputs(n=7, f=4)
    torch.library.opcheck(fused._affine_op, (*args, valid, 3))


class LargestTensor(TorchDispatchMode):
    """The largest tensor any operator returns, inside our custom ops too (their Python
    implementations run under this mode instead of opaquely)."""

    def __init__(self, impls):
        super().__init__()
        self.impls, self.largest = impls, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self.impls.get(func)
        if impl is not None:
            with self:
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.cpu_only
def test_no_tensor_of_n_by_features_in_forward_backward_or_saved(monkeypatch):
    """At n = 1024, F = 64 = 8 d: no tensor anywhere in forward + backward, and none saved
    for backward, exceeds b·h·n·(d + 1) entries (the (b, h, n, F) feature tensors of the
    untiled path hold 8× that); the saved ones add up to a few (b, h, n, d)."""
    monkeypatch.setattr(cl, "TILE_ELEMENTS", 1 << 12)  # tiles of 64 rows at this size
    b, h, n, d, r = 1, 2, 1024, 8, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).requires_grad_() for _ in range(3))
    w = draw_projection(r, d, seed=0)
    ops = torch.ops.transformer_zoo
    mode = LargestTensor({ops.causal_favor_affine.default: fused._forward,
                          ops.causal_favor_affine_backward.default: fused._gradients})
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t), mode:
        favor_attention(q, k, v, w, causal=True, chunk_size=64).sum().backward()
    bound = b * h * n * (d + 1)
    assert b * h * n * r >= 7 * bound
    assert mode.largest <= bound, mode.largest
    assert max(saved) <= bound and sum(saved) <= 6 * b * h * n * d, saved
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_a_subclass_that_changes_the_map_loses_the_fused_form():
    class Scaled(PositiveFeatures):
        def __call__(self, x_hat, w, *, query):
            return super().__call__(x_hat, 2 * w, query=query)

    w = torch.eye(4)
    assert PositiveFeatures().fused_affine(w)[0] is w
    assert Scaled().fused_affine(w) is None
    q, k, v = qkv(6, 6, d=4, b=1, h=1)
    got = favor_attention(q, k, v, w.double(), feature_map=Scaled(), causal=True)
    want = favor_attention(q, k, v, 2 * w.double(), causal=True)
    torch.testing.assert_close(got, want)


def test_per_head_weights_must_broadcast_into_the_heads():
    args, valid = affine_inputs(n=5, f=4, h=2)
    w_bad = torch.randn(3, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"W_F \(3, 4, 4\)"):
        fused.causal_favor_affine(*args[:3], w_bad, None, None, valid)
    with torch.no_grad():
        out = fused.causal_favor_affine(*args[:3], args[3], None, None, None)
    assert torch.isfinite(out).all()


@pytest.mark.cpu_only
def test_backward_saves_the_inputs_and_n_numbers_per_head_not_the_output():
    """The output is not saved for backward (backward recomputes its rows in the forward scan
    it runs anyway): beyond q, k, v themselves, what is saved holds O(n) per head (1/den)
    and O(F·d) (W_F), not the b·h·n·d of out (issue 16: the module's peak memory)."""
    b, h, n, d, r = 1, 2, 256, 8, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).requires_grad_() for _ in range(3))
    w = draw_projection(r, d, seed=0)
    inputs = {t.data_ptr() for t in (q, k, v)}
    other: list[int] = []

    def pack(t):
        if t.data_ptr() not in inputs:
            other.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = favor_attention(q, k, v, w, causal=True, chunk_size=64)
    assert sum(other) <= b * h * n + r * d, other  # out would add b·h·n·d = 4096
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.cpu_only
def test_backward_through_redone_steep_rows_equals_the_generic_path(monkeypatch):
    """Huge norms: the reverse and forward scans of backward redo steep rows (the forward
    scan's redo now runs before ∂den is formed from its output); gradients still equal the
    generic path's (features formed by the map, autograd of the scan) in fp64."""
    small_tiles(monkeypatch)
    redone = []
    redo = cl._redo_steep_rows

    def spy(*args):
        redone.append(bool(args[-2].any()))
        return redo(*args)

    monkeypatch.setattr(cl, "_redo_steep_rows", spy)
    q, k, v = qkv(50, 50, seed=2, scale=20.0)
    w = draw_projection(16, 8, seed=0, dtype=F64)
    results = []
    for fmap in (PositiveFeatures(), UnfusedPositive()):
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        out = favor_attention(*args, w, causal=True, chunk_size=4, feature_map=fmap)
        results.append((out, torch.autograd.grad(out.square().sum(), args)))
    assert any(redone)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    for got, want in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())
