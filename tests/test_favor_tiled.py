"""The map-calling tiled FAVOR kernels (``favor_tiled.py`` bidirectional, ``favor_causal_tiled.py``
causal) against ``favor_attention``'s generic path, which keeps the (b, h, n, F) features.

Oracle: the generic path itself (already tested against the papers' quadratic form in
``test_learned_feature_maps.py``), in fp64, values and every gradient (q, k, v and each
parameter of the map), with tiles forced small so that many tiles, and their seams, run.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import transformer_zoo.functional.causal_linear as cl
import transformer_zoo.functional.favor as favor_module
import transformer_zoo.functional.favor_tiled as ft
from transformer_zoo import (
    GeneralizedFeatures,
    HedgehogFeatures,
    LearnedPositiveFeatures,
    PerformerAttention,
    RotaryEmbedding,
    RotaryMode,
    T2RFeatures,
)
from transformer_zoo.functional import draw_projection, favor_attention
from transformer_zoo.functional.feature_maps import FeatureMap

F64 = torch.float64
H, D = 2, 8
SPECS = {
    "hedgehog": lambda: HedgehogFeatures(),
    "hedgehog-shared-nobias": lambda: HedgehogFeatures(shared_qk=True, feature_dim=6, bias=False),
    "t2r": lambda: T2RFeatures(),
    "t2r-two-maps": lambda: T2RFeatures(shared_qk=False, feature_dim=10),
    "learned-favor": lambda: LearnedPositiveFeatures(),
}


def built(name: str, seed: int = 0):
    torch.manual_seed(seed)
    fm = SPECS[name]().build(n_heads=H, head_dim=D, projection=draw_projection(12, D, seed=seed))
    fm = fm.to(F64)
    with torch.no_grad():  # off the init (identity / zeros are special points)
        for p in fm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return fm


@contextlib.contextmanager
def path(tiled: bool, calls: list | None = None):
    """``tiled``: the map-calling kernels on every problem, tiles of one row (bidirectional)
    or one chunk (causal); otherwise the generic path. ``calls`` records the tiled kernels
    that ran."""
    saved = ft.KEEP_ELEMENTS, ft.TILE_ELEMENTS, cl.TILE_ELEMENTS
    kernels = favor_module.tiled_favor, favor_module.causal_tiled_favor

    def spy(fn, name):
        def run(*a, **kw):
            if calls is not None:
                calls.append(name)
            return fn(*a, **kw)
        return run

    ft.KEEP_ELEMENTS, ft.TILE_ELEMENTS, cl.TILE_ELEMENTS = (-1, 1, 1) if tiled else \
        (1 << 60, *saved[1:])
    favor_module.tiled_favor = spy(kernels[0], "bidirectional")
    favor_module.causal_tiled_favor = spy(kernels[1], "causal")
    try:
        yield
    finally:
        ft.KEEP_ELEMENTS, ft.TILE_ELEMENTS, cl.TILE_ELEMENTS = saved
        favor_module.tiled_favor, favor_module.causal_tiled_favor = kernels


def out_and_grads(fm, q, k, v, *, tiled, calls=None, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    params = list(fm.parameters()) if isinstance(fm, torch.nn.Module) else list(kw.pop("params"))
    with path(tiled, calls):
        out = favor_attention(q, k, v, kw.pop("w", torch.empty(0, D, dtype=F64)),
                              feature_map=fm, **kw)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    return out, torch.autograd.grad((out * probe).sum(), [q, k, v, *params], allow_unused=True)


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SPECS)), causal=st.booleans(), b=st.integers(1, 2),
       n=st.integers(1, 11), m=st.integers(1, 11), padded=st.booleans(), gqa=st.booleans(),
       chunk=st.integers(1, 4), scale=st.sampled_from([0.5, 1.0, 8.0]),
       seed=st.integers(0, 2**31 - 1))
def test_tiled_equals_generic(name, causal, b, n, m, padded, gqa, chunk, scale, seed):
    """Outputs and ∂q, ∂k, ∂v, ∂(every map parameter) equal the generic path's in fp64 over
    cross lengths (causal: bottom-right aligned), random padding incl. samples without a
    key, grouped-query k/v (one kv head), large norms (scale 8: the stabilisers matter)."""
    fm = built(name, seed % 97)
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(b, H, n, D, generator=g, dtype=F64)
    k = scale * torch.randn(b, 1 if gqa else H, m, D, generator=g, dtype=F64)
    v = torch.randn(b, 1 if gqa else H, m, D, generator=g, dtype=F64)
    mask = torch.rand(b, m, generator=g) < 0.7 if padded else None
    calls: list[str] = []
    kw = dict(causal=causal, key_padding_mask=mask, chunk_size=chunk)
    got = out_and_grads(fm, q, k, v, tiled=True, calls=calls, **kw)
    assert calls == ["causal" if causal else "bidirectional"]
    assert all(torch.isfinite(t).all() for t in (got[0], *got[1]))
    assert_same(got, out_and_grads(fm, q, k, v, tiled=False, **kw))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_nothing_of_n_by_features_is_saved(name, causal):
    """Nothing saved for backward holds b·h·n·F entries on the tiled path (F = 64 = 8 d
    here: the saved tensors are q, k, v-sized or smaller), while the generic path saves its
    (b, h, n, F) features (so this test fails on a path that keeps them)."""
    torch.manual_seed(0)
    b, n, f = 1, 256, 64
    spec = {"hedgehog": HedgehogFeatures(feature_dim=f // 2),
            "hedgehog-shared-nobias": HedgehogFeatures(shared_qk=True, feature_dim=f // 2,
                                                       bias=False),
            "t2r": T2RFeatures(feature_dim=f), "t2r-two-maps": T2RFeatures(feature_dim=f,
                                                                         shared_qk=False),
            "learned-favor": LearnedPositiveFeatures()}[name]
    fm = spec.build(n_heads=H, head_dim=D, projection=draw_projection(f, D, seed=0)).to(F64)
    q, k, v = (torch.randn(b, H, n, D, dtype=F64, requires_grad=True) for _ in range(3))
    sizes = {}
    for tiled in (True, False):
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with path(tiled), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = favor_attention(q, k, v, torch.empty(f, D, dtype=F64), feature_map=fm,
                                  causal=causal, chunk_size=8)
        out.sum().backward()
        sizes[tiled] = max(saved)
    assert sizes[False] >= b * H * n * f  # the generic path keeps the features
    assert sizes[True] <= b * H * n * D, sizes  # the tiled one: inputs and smaller


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["hedgehog", "t2r", "learned-favor"])
def test_double_backward_equals_generic(name, causal):
    """create_graph=True: ∂(|∂out/∂q|²)/∂(k, map parameters) equals the generic path's."""
    fm = built(name)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, H, 7, D, generator=g, dtype=F64) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False  # leading padding: the causal first-key fill
    results = []
    for tiled in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with path(tiled):
            out = favor_attention(qq, kk, vv, torch.empty(0, D, dtype=F64), feature_map=fm,
                                  causal=causal, key_padding_mask=mask, chunk_size=3)
            (gq,) = torch.autograd.grad(out.square().sum(), [qq], create_graph=True)
        results.append(torch.autograd.grad(gq.square().sum(), [kk, *fm.parameters()]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rotary", list(RotaryMode))
@pytest.mark.parametrize("causal", [False, True])
def test_module_with_rotary_and_padding_equals_generic(causal, rotary):
    """PerformerAttention (RoPE, a padding mask): output and the gradient of every parameter
    (projections and map) agree between the two paths. The q/k rotary mode is tiled; the
    numerator-only mode (it rotates φ(q), φ(k) themselves) keeps the generic path."""
    torch.manual_seed(0)
    attn = PerformerAttention(16, H, nb_features=12, feature_map=HedgehogFeatures(), seed=0,
                              causal=causal, positional=RotaryEmbedding(head_dim=8),
                              rotary=rotary).double()
    x = torch.randn(2, 9, 16, dtype=F64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    results = []
    for tiled in (True, False):
        calls: list[str] = []
        attn.zero_grad()
        with path(tiled, calls):
            out = attn(x, mask=mask)
        assert bool(calls) == (tiled and rotary is RotaryMode.QUERY_KEY)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in attn.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_functional_call_gradients_reach_the_given_tensors(causal):
    """torch.func.functional_call with stand-in map parameters: the tiled kernels compute
    with the stand-ins (not the module's own) and return their gradients."""
    torch.manual_seed(0)
    attn = PerformerAttention(16, H, nb_features=12, feature_map=T2RFeatures(),
                              causal=causal, seed=0).double()
    x = torch.randn(2, 9, 16, dtype=F64)
    stand_ins = {name: (p.detach() + 0.5 * torch.randn_like(p)).requires_grad_()
                 for name, p in attn.named_parameters() if name.startswith("feature_map.")}
    results = []
    for tiled in (True, False):
        with path(tiled):
            out = torch.func.functional_call(attn, stand_ins, (x,))
        results.append([out.detach(), *torch.autograd.grad(out.square().sum(),
                                                           list(stand_ins.values()))])
    with path(False):
        own = attn(x)
    assert not torch.allclose(own, results[0][0])  # the stand-ins were used
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast_features_in_fp32_with_gradients_to_the_map(causal):
    """Under bf16 autocast the tiled kernels form features in fp32 as the generic path does
    (the two agree to fp32 rounding) and the map's parameters get their gradients."""
    torch.manual_seed(0)
    attn = PerformerAttention(32, H, nb_features=16, feature_map=HedgehogFeatures(), seed=0,
                              causal=causal)
    x = torch.randn(2, 40, 32)
    results = []
    for tiled in (True, False):
        attn.zero_grad()
        with path(tiled), torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
        out.float().square().sum().backward()
        results.append([out.float(), *(p.grad.clone() for p in attn.feature_map.parameters())])
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in results[0][1:])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


class ScaledRelu(FeatureMap):
    """A user's map holding a learnable tensor: φ(x̂) = ReLU(W x̂) ⊙ a."""

    exponential = False

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a

    def __call__(self, x_hat, w, *, query):
        return self.features_with((self.a,), x_hat, w, query=query)

    def tile_parameters(self):
        return (self.a,)

    def features_with(self, parameters, x_hat, w, *, query):
        return torch.relu(x_hat @ w.transpose(-2, -1)) * parameters[0]


@pytest.mark.parametrize("causal", [False, True])
def test_a_user_map_naming_its_tensors_is_tiled_exactly(causal):
    w = draw_projection(12, D, seed=0).to(F64)
    a = torch.rand(12, dtype=F64, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, H, 8, D, generator=g, dtype=F64) for _ in range(3))
    calls: list[str] = []
    kw = dict(w=w, causal=causal, chunk_size=2)
    got = out_and_grads(ScaledRelu(a), q, k, v, tiled=True, calls=calls, params=[a], **kw)
    assert calls
    assert_same(got, out_and_grads(ScaledRelu(a), q, k, v, tiled=False, params=[a], **kw))


def test_maps_that_do_not_name_their_tensors_keep_the_generic_path():
    """tile_parameters() is None by default, for GeneralizedFeatures (its fn may hold
    tensors), and for a subclass that redefines __call__ (its map is no longer the parent's)."""

    class Doubled(HedgehogFeatures):
        def __call__(self, x_hat, w=None, *, query):
            return 2 * super().__call__(x_hat, w, query=query)

    assert GeneralizedFeatures().tile_parameters() is None
    assert Doubled(n_heads=H, head_dim=D).tile_parameters() is None
    assert HedgehogFeatures(n_heads=H, head_dim=D).tile_parameters() is not None
    calls: list[str] = []
    q, k, v = (torch.randn(1, H, 5, D, dtype=F64) for _ in range(3))
    with path(True, calls):
        favor_attention(q, k, v, torch.randn(6, D, dtype=F64), feature_map=GeneralizedFeatures())
    assert calls == []
