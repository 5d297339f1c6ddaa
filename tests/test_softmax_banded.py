"""The band kernel (``functional.softmax_banded``): far keys through the fused kernel with the
encoding's separable far-field terms, the band with the bias itself. Outputs and gradients
(q, k, v and the encoding's parameters) equal the materialised path in fp64 for T5 (both
bucketings), ALiBi (both forms) and Shaw (value term), with causal and cross lengths, position
offsets, GQA, key padding and block sizes; each encoding's ``far_field`` equals its
``forward`` on every far pair; the encoding never sees more than one block's band."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_softmax_blockwise import materialised
from torch import nn

import transformer_zoo.functional.deberta_band as deberta_module
import transformer_zoo.functional.softmax_banded as banded
from transformer_zoo import (
    ALiBi,
    DebertaRelativeBias,
    ShawRelativePosition,
    SoftmaxAttention,
    T5RelativeBias,
)
from transformer_zoo.functional.softmax_blockwise import blockwise_softmax_attention
from transformer_zoo.positional.base import BandRows, FarField

F64 = torch.float64
real_worth_it = banded._worth_it
ENCODINGS = ["t5", "t5_causal", "alibi", "alibi_causal", "shaw", "deberta"]
DEBERTA = [dict(position_buckets=-1, max_relative_positions=6, pos_att_type=("c2p", "p2c")),
           dict(position_buckets=4, max_relative_positions=12, pos_att_type=("c2p", "p2c")),
           dict(position_buckets=8, max_relative_positions=24, pos_att_type=("c2p",)),
           dict(position_buckets=4, max_relative_positions=16, pos_att_type=("p2c",))]


def make_encoding(name: str, h: int, d: int, **options):
    torch.manual_seed(0)
    if name.startswith("alibi"):
        return ALiBi(n_heads=h, causal=name.endswith("causal"))
    if name == "deberta":
        enc = DebertaRelativeBias(d_model=h * d, n_heads=h, head_dim=d,
                                  **DEBERTA[options.get("variant", 1)])
    elif name.startswith("t5"):
        enc = T5RelativeBias(n_heads=h, causal=name.endswith("causal"),
                             num_buckets=options.get("num_buckets", 8),
                             max_distance=options.get("max_distance", 6))
    else:
        enc = ShawRelativePosition(head_dim=d, max_distance=options.get("max_distance", 3))
    for p in enc.parameters():
        nn.init.normal_(p, std=1.0)
    return enc.double()


@contextlib.contextmanager
def always_banded():
    """Serve every call the band kernel can take, however wide the band (hypothesis-safe)."""
    real, calls = banded._worth_it, []
    apply = banded.BandedBiasAttention.apply

    def spy(*args):
        calls.append(args[0])
        return apply(*args)

    banded._worth_it = lambda m, rows, band: True
    banded.BandedBiasAttention.apply = spy
    try:
        yield calls
    finally:
        banded._worth_it = real
        banded.BandedBiasAttention.apply = apply


@st.composite
def problems(draw):
    enc = draw(st.sampled_from(ENCODINGS))
    causal = enc.endswith("causal") or draw(st.booleans())
    b, h_kv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = h_kv * draw(st.integers(1, 2))
    n = draw(st.integers(1, 40))
    m = draw(st.integers(max(1, n if causal else 1), 48))
    d = 4
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, h, n, d, generator=g, dtype=F64)
    k = torch.randn(b, h_kv, m, d, generator=g, dtype=F64)
    v = torch.randn(b, h_kv, m, d, generator=g, dtype=F64)
    q0, k0 = draw(st.integers(-5, 20)), draw(st.integers(-5, 20))
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(b, 1, 1, m, generator=g) < 0.8
    return dict(enc=enc, q=q, k=k, v=v, q_positions=torch.arange(n) + q0,
                k_positions=torch.arange(m) + k0, mask=mask, bias=None, causal=causal,
                scale=draw(st.sampled_from([None, 0.4])), block_size=draw(st.integers(1, 9)),
                p2c_keys=draw(st.sampled_from([1, 3, 128])),  # DeBERTa's p2c pieces
                options=dict(num_buckets=draw(st.sampled_from([4, 8, 12])),
                             max_distance=draw(st.integers(7, 12)) if enc.startswith("t5")
                             else draw(st.integers(1, 4)),
                             variant=draw(st.integers(0, len(DEBERTA) - 1))))


def _run(fn, p, positional):
    leaves = [t.detach().clone().requires_grad_() for t in (p["q"], p["k"], p["v"])]
    out = fn(*leaves, positional=positional, q_positions=p["q_positions"],
             k_positions=p["k_positions"], mask=p["mask"], bias=None, causal=p["causal"],
             scale=p["scale"])
    wrt = [*leaves, *(x for x in positional.parameters() if x.requires_grad)]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    grads = torch.autograd.grad((out * weights).sum(), wrt, allow_unused=True)
    return out.detach(), [torch.zeros_like(w) if g is None else g for w, g in
                          zip(wrt, grads, strict=True)]


@pytest.mark.cpu_only
@settings(max_examples=60, deadline=None)
@given(problems())
def test_banded_equals_materialised_outputs_and_gradients(p):
    h, d = p["q"].shape[1], p["q"].shape[-1]
    positional = make_encoding(p["enc"], h, d, **p["options"])
    twin = copy.deepcopy(positional)
    pieces = deberta_module.P2C_KEYS
    deberta_module.P2C_KEYS = p["p2c_keys"]
    try:
        with always_banded() as calls:
            out, grads = _run(lambda *a, **kw: blockwise_softmax_attention(
                *a, block_size=p["block_size"], **kw), p, positional)
    finally:
        deberta_module.P2C_KEYS = pieces
    assert len(calls) == 1  # the band kernel served it
    ref, ref_grads = _run(materialised, p, twin)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(enc=st.sampled_from(ENCODINGS), q0=st.integers(-20, 200), k0=st.integers(-20, 200),
       num_buckets=st.sampled_from([4, 8, 32]), max_distance=st.integers(1, 140),
       variant=st.integers(0, len(DEBERTA) - 1), seed=st.integers(0, 1000))
def test_far_field_equals_forward_on_far_pairs(enc, q0, k0, num_buckets, max_distance,
                                               variant, seed):
    """Every pair at pos_j − pos_i <= −R gets left.row_i + left.key_j, >= R right's; Shaw's
    value term on far keys is Σ_j α_ij · side.value."""
    if enc.startswith("t5") and max_distance <= (num_buckets if enc.endswith("causal")
                                                 else num_buckets // 2) // 2:
        max_distance += num_buckets
    h, d, n, m = 3, 4, 40, 300
    positional = make_encoding(enc, h, d, num_buckets=num_buckets, max_distance=max_distance,
                               variant=variant)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, n, d, generator=g, dtype=F64)
    k = torch.randn(2, h, m, d, generator=g, dtype=F64)
    qp, kp = torch.arange(n) + q0, torch.arange(m) + k0
    keys = {"k": k} if positional.needs_keys else {}
    far = positional.far_field(q, qp, kp, **keys)
    radius = positional.far_radius()
    assert isinstance(far, FarField) and radius >= 1
    bias = positional(q, qp, kp, **keys).expand(2, h, n, m)
    tol = 1e-6 if bias.dtype == torch.float32 else 1e-12  # ALiBi's forward is fp32
    bias = bias.to(F64)
    delta = kp[None, :] - qp[:, None]  # (n, m)

    def terms(side):
        row = torch.zeros(2, h, n, 1, dtype=F64) if side.row is None else (
            side.row.to(F64).expand(2, h, n)[..., None])
        key = torch.zeros(2, h, 1, m, dtype=F64) if side.key is None else (
            side.key.to(F64).expand(2, h, m)[..., None, :])
        return (row + key).expand(2, h, n, m)

    for side, where in ((far.left, delta <= -radius), (far.right, delta >= radius)):
        torch.testing.assert_close(bias[..., where], terms(side)[..., where], rtol=tol,
                                   atol=tol)
        if positional.has_value_term:
            w = torch.rand(2, h, n, m, generator=g, dtype=F64) * where
            want = positional.value_term(w, qp, kp)
            got = w.sum(-1, keepdim=True) * side.value.to(F64)
            torch.testing.assert_close(want, got, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("enc", ["t5", "alibi", "shaw", "deberta"])
def test_module_default_uses_the_band_and_never_a_full_row(enc):
    """``SoftmaxAttention``'s blockwise path takes the band kernel by itself; the encoding's
    forward only ever sees sub-blocks (rows x (rows + 2R) keys, never all m keys), and the
    result equals the materialised module's, gradients included."""
    torch.manual_seed(0)
    n, h = 1024, 2
    make = {"t5": lambda: T5RelativeBias(n_heads=h), "alibi": lambda: ALiBi(n_heads=h),
            "shaw": lambda: ShawRelativePosition(head_dim=8),
            "deberta": lambda: DebertaRelativeBias(d_model=16, n_heads=h, position_buckets=8,
                                                   max_relative_positions=32)}[enc]
    attn = SoftmaxAttention(16, h, positional=make(), blockwise=True, block_size=64).double()
    ref = copy.deepcopy(attn)
    ref.blockwise = False
    seen = []
    hook = attn.positional.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    band_rows = attn.positional.band_rows

    def recorded(*args, **kwargs):  # the band's bias rows, whichever way they are built
        band = band_rows(*args, **kwargs)

        def rows(*a):
            out = band.rows(*a)
            seen.append(out.shape)
            return out

        return BandRows(band.tables, rows)

    attn.positional.band_rows = recorded
    x = torch.randn(2, n, 16, dtype=F64, requires_grad=True)
    with always_banded() as calls:
        banded._worth_it = real_worth_it  # the module's own dispatch decides
        y = attn(x)
    assert len(calls) == 1
    hook.remove()
    del attn.positional.band_rows
    assert seen and all(s[-1] < n and s[-2] < n for s in seen)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    wrt = [x, *attn.parameters()]
    g1 = torch.autograd.grad(y.square().sum(), wrt)
    g2 = torch.autograd.grad(y_ref.square().sum(), [x, *ref.parameters()])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_fallbacks_keep_the_blockwise_kernel():
    """Positions with gaps, a mask with query rows, an additive bias or half precision: the
    band kernel declines (the blockwise kernel serves them, tested in test_softmax_blockwise)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 4, dtype=F64) for _ in range(3))
    pe = make_encoding("t5", 2, 4)
    with always_banded() as calls:
        blockwise_softmax_attention(q, k, v, positional=pe, k_positions=torch.arange(64) * 2)
        blockwise_softmax_attention(q, k, v, positional=pe, mask=torch.rand(64, 64) < 0.9)
        blockwise_softmax_attention(q, k, v, positional=pe, bias=torch.zeros(64, 64,
                                                                              dtype=F64))
        blockwise_softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                    positional=make_encoding("alibi", 2, 4))
        assert calls == []
        blockwise_softmax_attention(q, k, v, positional=pe)
        assert len(calls) == 1


def test_fully_padded_rows_and_nothing_n_by_m_saved():
    """A batch entry whose keys are all padding gives 0 and finite gradients; nothing with
    as many elements as one head's n x m weights is saved for the backward."""
    torch.manual_seed(0)
    n, h, d = 96, 2, 4
    pe = make_encoding("shaw", h, d)
    q, k, v = (torch.randn(2, h, n, d, dtype=F64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1] = False
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with always_banded() as calls, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = blockwise_softmax_attention(q, k, v, positional=pe, mask=mask, block_size=8)
    assert len(calls) == 1
    assert max(sizes) < n * n
    assert out[1].abs().max() == 0
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("enc", ["t5", "alibi", "shaw"])
def test_fp32_matches_materialised(enc):
    """fp32 at large positions (8000 + i): ALiBi's terms m_h·pos are re-referenced at the key
    nearest each block, so the far columns stay small (without that: errors ~1e-4)."""
    torch.manual_seed(0)
    h, d, n = 4, 16, 600
    pe = make_encoding(enc, h, d).float()
    twin = copy.deepcopy(pe)
    q, k, v = (torch.randn(1, h, n, d) for _ in range(3))
    pos = torch.arange(n) + 8000
    with always_banded() as calls:
        out = blockwise_softmax_attention(q, k, v, positional=pe, block_size=64,
                                          q_positions=pos, k_positions=pos)
    assert len(calls) == 1
    ref = materialised(q.double(), k.double(), v.double(), positional=twin.double(),
                       q_positions=pos, k_positions=pos, mask=None, bias=None, causal=False,
                       scale=None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


def test_a_subclass_that_changes_the_bias_loses_the_far_field():
    """A subclass redefining ``forward`` (or ``value_term``) without ``far_radius`` gets None:
    its parent's far terms no longer describe its bias, so the blockwise kernel serves it."""

    class Doubled(T5RelativeBias):
        def forward(self, q, q_positions, k_positions):
            return 2 * super().forward(q, q_positions, k_positions)

    class OwnFarField(T5RelativeBias):
        def forward(self, q, q_positions, k_positions):
            return super().forward(q, q_positions, k_positions)

        def far_radius(self):
            return super().far_radius()

    assert Doubled(n_heads=2).far_radius() is None
    assert OwnFarField(n_heads=2).far_radius() == T5RelativeBias(n_heads=2).far_radius()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 4, dtype=F64) for _ in range(3))
    pe = Doubled(n_heads=2, num_buckets=8, max_distance=6).double()
    with always_banded() as calls:
        out = blockwise_softmax_attention(q, k, v, positional=pe, block_size=4)
    assert calls == []
    ref = materialised(q, k, v, positional=pe, q_positions=torch.arange(64),
                       k_positions=torch.arange(64), mask=None, bias=None, causal=False,
                       scale=None)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
