"""The exact blockwise logit-bias kernel (``functional.blockwise_softmax_attention``) and
``SoftmaxAttention``'s long-bias dispatch: outputs and gradients (inputs, encoding parameters,
an additive mask) equal the materialised path in fp64 for every encoding (T5, ALiBi, Shaw and
a content-dependent toy that reads the keys), every mask rank, positions (n,)/(b, n), GQA,
causal cross lengths and block sizes; the encoding is only ever called on row blocks."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import transformer_zoo.attention.softmax as softmax_module
import transformer_zoo.functional.softmax_blockwise_lse as lse_module
from transformer_zoo import ALiBi, ShawRelativePosition, SoftmaxAttention, T5RelativeBias
from transformer_zoo.functional.softmax import (
    expand_kv_heads,
    explicit_softmax_attention,
    softmax_attention,
)
from transformer_zoo.functional.softmax_blockwise import (
    block_rows,
    blockwise_softmax_attention,
)
from transformer_zoo.positional.base import LogitBias

F64 = torch.float64


class ToyContentBias(LogitBias):
    """A content-dependent bias that reads the keys: (q_i·w)(k_j·u) + c·(pos_j − pos_i),
    with its own logit scale (not 1/√d), to exercise ``needs_keys`` and ``logit_scale``."""

    needs_keys = True

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(head_dim, generator=g))
        self.u = nn.Parameter(torch.randn(head_dim, generator=g))
        self.c = nn.Parameter(torch.tensor(0.3))
        self.rows_seen: list[int] = []

    def logit_scale(self, head_dim: int) -> float:
        return 0.7 / head_dim

    def forward(self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                k: Tensor | None = None) -> Tensor:
        assert k is not None
        self.rows_seen.append(q.shape[2])
        r = (k_positions[..., None, :] - q_positions[..., :, None]).to(q.dtype)
        r = r[None] if r.ndim == 2 else r  # (1|b, n, m)
        content = (q @ self.w.to(q.dtype))[..., :, None] * (k @ self.u.to(q.dtype))[..., None, :]
        return content + self.c.to(q.dtype) * r[:, None]  # (b, h, n, m)


def make_encoding(name: str, h: int, d: int, causal: bool) -> LogitBias | None:
    torch.manual_seed(0)
    if name == "none":
        return None
    if name == "alibi":
        return ALiBi(n_heads=h, causal=causal)
    if name == "t5":
        enc = T5RelativeBias(n_heads=h, causal=causal, num_buckets=8, max_distance=6)
        nn.init.normal_(enc.weight, std=1.0)
        return enc.double()
    if name == "shaw":
        enc = ShawRelativePosition(head_dim=d, max_distance=3)
        for p in enc.parameters():
            nn.init.normal_(p, std=1.0)
        return enc.double()
    return ToyContentBias(d).double()


ENCODINGS = ["none", "alibi", "t5", "shaw", "toy"]


def materialised(q, k, v, *, positional, q_positions, k_positions, mask, bias, causal, scale):
    """The materialised form: the full (b, h, n, m) bias, one softmax (the library's
    pre-existing path, itself tested against a row-by-row reference in test_softmax)."""
    h = q.shape[1]
    full = bias
    if positional is not None:
        if positional.needs_keys:
            pe = positional(q, q_positions, k_positions, k=expand_kv_heads(k, v, h)[0])
        else:
            pe = positional(q, q_positions, k_positions)
        full = pe if full is None else pe + full
        scale = positional.logit_scale(q.shape[-1]) if scale is None else scale
    if positional is not None and positional.has_value_term:
        out, weights = explicit_softmax_attention(q, k, v, mask=mask, bias=full, causal=causal,
                                                  scale=scale)
        return out + positional.value_term(weights, q_positions, k_positions)
    return softmax_attention(q, k, v, mask=mask, bias=full, causal=causal, scale=scale)


@st.composite
def problems(draw):
    enc = draw(st.sampled_from(ENCODINGS))
    causal = draw(st.booleans())
    b, h_kv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = h_kv * draw(st.integers(1, 2))
    n, m = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d = 4
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, h, n, d, generator=g, dtype=F64)
    k = torch.randn(b, h_kv, m, d, generator=g, dtype=F64)
    v = torch.randn(b, h_kv, m, d, generator=g, dtype=F64)
    offset = draw(st.integers(0, 3))
    if draw(st.booleans()):  # batched positions (b, n): per-sample offsets
        q_pos = torch.arange(n)[None] + torch.randint(0, 4, (b, 1), generator=g)
        k_pos = torch.arange(m)[None] + torch.randint(0, 4, (b, 1), generator=g)
    else:
        q_pos, k_pos = torch.arange(n) + offset + max(m - n, 0), torch.arange(m) + offset
    mask_shape = draw(st.sampled_from([None, (b, 1, 1, m), (b, h, n, m), (n, m), (1, h, 1, m),
                                       (), (m,), (h, 1, m), (1, 1, n, 1)]))
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g) < 0.7
    bias_shape = draw(st.sampled_from([None, (1, h, n, m), (b, 1, 1, m), (n, m), (1, n, 1)]))
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g, dtype=F64)
    if bias is not None and draw(st.booleans()):
        bias = bias.masked_fill(torch.rand(bias_shape, generator=g) < 0.2, float("-inf"))
    return dict(
        enc=enc, q=q, k=k, v=v, q_positions=q_pos, k_positions=k_pos, mask=mask, bias=bias,
        causal=causal, scale=draw(st.sampled_from([None, 0.4])),
        block_size=draw(st.integers(1, 10)),
    )


def _run(fn, p, positional):
    """Output and the gradients of q, k, v, the additive bias and the encoding's parameters."""
    leaves = [t.detach().clone().requires_grad_() for t in (p["q"], p["k"], p["v"])]
    bias = None
    if p["bias"] is not None:
        bias = p["bias"].detach().clone().requires_grad_()
    out = fn(*leaves, positional=positional, q_positions=p["q_positions"],
             k_positions=p["k_positions"], mask=p["mask"], bias=bias, causal=p["causal"],
             scale=p["scale"])
    params = [] if positional is None else [x for x in positional.parameters()
                                           if x.requires_grad]
    wrt = [*leaves, *([bias] if bias is not None else []), *params]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    grads = torch.autograd.grad((out * weights).sum(), wrt, allow_unused=True)
    return out.detach(), [torch.zeros_like(w) if g is None else g for w, g in
                          zip(wrt, grads, strict=True)]


@pytest.mark.cpu_only
@given(problems())
def test_blockwise_equals_materialised_outputs_and_gradients(p):
    h, d = p["q"].shape[1], p["q"].shape[-1]
    positional = make_encoding(p["enc"], h, d, p["causal"])
    twin = copy.deepcopy(positional)
    out, grads = _run(lambda *a, **kw: blockwise_softmax_attention(
        *a, block_size=p["block_size"], **kw), p, positional)
    ref, ref_grads = _run(materialised, p, twin)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


def test_encoding_is_called_on_row_blocks_only():
    """No call sees more than block_size query rows, and the rows cover n once (forward)
    and once more in the backward, after one-row probes that find the bias's parameters and
    its per-call work; without grad, no probe."""
    torch.manual_seed(0)
    enc = ToyContentBias(4).double()
    q, k, v = (torch.randn(1, 2, 23, 4, dtype=F64, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        blockwise_softmax_attention(q, k, v, positional=enc, block_size=5)
    assert enc.rows_seen == [5, 5, 5, 5, 3]
    enc.rows_seen.clear()
    out = blockwise_softmax_attention(q, k, v, positional=enc, block_size=5)
    assert enc.rows_seen == [1, 1, 1, 5, 5, 5, 5, 3]  # probes: leaves, then shared nodes
    out.sum().backward()
    assert enc.rows_seen == [1, 1, 1] + [5, 5, 5, 5, 3] * 2
    assert enc.w.grad is not None and enc.w.grad.abs().sum() > 0


def test_fully_masked_rows_give_zero_and_finite_gradients():
    enc = T5RelativeBias(n_heads=2).double()
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=F64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, 2] = False  # row 2 of sample 0 has no key
    out = blockwise_softmax_attention(q, k, v, positional=enc, mask=mask, block_size=4)
    assert (out[0, :, 2] == 0).all()
    out.sum().backward()
    for t in (q, k, v, enc.weight):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0, :, 2] == 0).all()


@pytest.mark.parametrize("enc", ["t5", "shaw"])
def test_dropout_recompute_sees_the_forward_mask(enc):
    """With dropout, the recomputing backward replays the forward's dropout masks (RNG state
    restored per block): gradients equal a loop over the same blocks without checkpoints, run
    from the same seed (same draws in the same order); for Shaw one mask serves both terms."""
    positional = make_encoding(enc, 2, 4, False)
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(1, 2, 11, 4, generator=g, dtype=F64) for _ in range(3)]
    pos = torch.arange(11)

    def reference(q, k, v):
        outs = []
        for i0 in range(0, 11, 4):
            qb, qp = q[:, :, i0:i0 + 4], pos[i0:i0 + 4]
            bias = positional(qb, qp, pos)
            if positional.has_value_term:
                out, w = explicit_softmax_attention(qb, k, v, bias=bias)
                w = F.dropout(w, p=0.4)
                outs.append(w @ v + positional.value_term(w, qp, pos))
            else:
                outs.append(softmax_attention(qb, k, v, bias=bias, dropout_p=0.4))
        return torch.cat(outs, dim=2)

    results = []
    for fn in (reference, lambda q, k, v: blockwise_softmax_attention(
            q, k, v, positional=positional, dropout_p=0.4, block_size=4)):
        leaves = [t.clone().requires_grad_() for t in base]
        torch.manual_seed(11)
        out = fn(*leaves)
        params = list(positional.parameters())
        grads = torch.autograd.grad(out.square().sum(), [*leaves, *params])
        results.append((out.detach(), grads))
    (out, grads), (ref, ref_grads) = results[1], results[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert (out != softmax_attention(*base, bias=positional(base[0], pos, pos))).any()  # dropped
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_block_rows_default_and_validation():
    assert block_rows(1, 8, 8192, 8192) == 32  # 2^21 elements per block
    assert block_rows(1, 1, 10, 10) == 10  # never more than n
    assert block_rows(1, 8, 10**6, 10**6) == 16  # at least 16 rows
    assert block_rows(1, 8, 100, 100, 7) == 7
    with pytest.raises(ValueError, match="block_size"):
        block_rows(1, 8, 100, 100, 0)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="LogitBias"):
        blockwise_softmax_attention(q, q, q, positional=nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        blockwise_softmax_attention(q, q, q, mask=torch.ones(5, 5, dtype=torch.bool))


# -- the module's dispatch -------------------------------------------------------------------


def _module_pair(enc: str, causal: bool, **options):
    d_model, h = 16, 4
    positional = make_encoding(enc, h, d_model // h, causal)
    torch.manual_seed(1)
    dense = SoftmaxAttention(d_model, h, causal=causal, positional=positional,
                             blockwise=False).double()
    long = copy.deepcopy(dense)
    long.blockwise, long.block_size = True, options.get("block_size", 3)
    return dense, long


@pytest.mark.parametrize("enc", ENCODINGS[1:])
@pytest.mark.parametrize("causal", [False, True])
def test_module_blockwise_equals_materialised(enc, causal):
    dense, long = _module_pair(enc, causal)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 10, 16, generator=g, dtype=F64)
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    attn_mask = torch.rand(10, 10, generator=g) < 0.8
    positions = torch.arange(10)[None] + torch.tensor([[0], [5]])
    results = []
    for module in (dense, long):
        xi = x.clone().requires_grad_()
        out = module(xi, mask=mask, attn_mask=attn_mask, positions=positions)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, [p.grad for p in module.parameters()]))
    (o1, g1, p1), (o2, g2, p2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-11)
    for a, b in zip(p2, p1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_module_call_bias_rows_are_sliced():
    """A float additive mask from interop (``call_bias``, with and without an n dim) reaches
    every block's rows: equal to the materialised path."""
    dense, long = _module_pair("t5", False)
    x = torch.randn(1, 7, 16, dtype=F64)
    for call_bias in (torch.randn(1, 4, 7, 7, dtype=F64), torch.randn(1, 1, 1, 7, dtype=F64)):
        outs = []
        for module in (dense, long):
            module.call_bias = call_bias
            try:
                outs.append(module(x))
            finally:
                module.call_bias = None
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


def test_module_dispatches_by_size(monkeypatch):
    """blockwise=None: the materialised bias up to LONG_BIAS_ELEMENTS, blockwise beyond it;
    True / False force either path; plain attention never takes it."""
    calls = []
    real = softmax_module.blockwise_softmax_attention
    monkeypatch.setattr(softmax_module, "blockwise_softmax_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(softmax_module, "LONG_BIAS_ELEMENTS", 2 * 4 * 8 * 8)
    attn = SoftmaxAttention(16, 4, positional=ALiBi(n_heads=4))
    attn(torch.randn(2, 8, 16))  # b·h·n·m = threshold: materialised
    assert calls == []
    attn(torch.randn(2, 9, 16))  # above: blockwise
    assert calls == [1]
    attn.blockwise = False
    attn(torch.randn(2, 9, 16))
    assert calls == [1]
    attn.blockwise = True
    attn(torch.randn(1, 2, 16))
    assert calls == [1, 1]
    SoftmaxAttention(16, 4, blockwise=True)(torch.randn(2, 9, 16))  # no encoding: SDPA
    assert calls == [1, 1]


def test_module_options_are_checked():
    with pytest.raises(TypeError, match="blockwise"):
        SoftmaxAttention(16, 4, blockwise="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        SoftmaxAttention(16, 4, block_size=0)
    assert "blockwise=True" in repr(SoftmaxAttention(16, 4, blockwise=True))


# -- the log-sum-exp Function (functional.softmax_blockwise_lse) ---------------------------------
@pytest.mark.cpu_only
@settings(max_examples=30, deadline=None)
@given(problems())
def test_matmul_path_equals_materialised(p):
    """The matmul path (what runs off CPU, and for blocks the fused kernel cannot take) =
    materialised, outputs and every gradient, fp64."""
    h, d = p["q"].shape[1], p["q"].shape[-1]
    positional = make_encoding(p["enc"], h, d, p["causal"])
    twin = copy.deepcopy(positional)
    with fused_off():
        out, grads = _run(lambda *a, **kw: blockwise_softmax_attention(
            *a, block_size=p["block_size"], **kw), p, positional)
    ref, ref_grads = _run(materialised, p, twin)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@contextlib.contextmanager
def fused_off():
    """Turn the fused CPU kernel off (hypothesis-safe: no function-scoped fixture)."""
    real = lse_module._fused
    lse_module._fused = lambda q: False
    try:
        yield
    finally:
        lse_module._fused = real


@pytest.mark.parametrize("enc", ["alibi", "t5", "shaw", "toy"])
def test_nothing_of_size_n_by_m_is_saved(enc):
    """Saved for the backward: q, k, v, the output, the log-sum-exp and the encoding's
    parameters — no tensor with as many elements as one head's n x m weights."""
    torch.manual_seed(0)
    n, h, d = 96, 2, 4
    positional = make_encoding(enc, h, d, False)
    q, k, v = (torch.randn(1, h, n, d, dtype=F64, requires_grad=True) for _ in range(3))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = blockwise_softmax_attention(q, k, v, positional=positional, block_size=8)
    assert sizes and max(sizes) < n * n
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


class BorrowedWeightBias(LogitBias):
    """A bias whose parameter lives in another module (held in a plain tuple, as DeBERTa's
    share_att_key holds the attention's projections): not in ``self.parameters()``."""

    def __init__(self, owner: nn.Linear) -> None:
        super().__init__()
        self._borrowed = (owner,)

    def forward(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        w = self._borrowed[0].weight  # (1, d)
        r = (k_positions - q_positions[..., None]).to(q.dtype)  # (n, m)
        return (q @ w.T.to(q.dtype)) * r  # (b, h, n, 1) * (n, m) -> (b, h, n, m)


def test_gradient_reaches_borrowed_parameters_and_autograd_grad_works():
    torch.manual_seed(1)
    owner = nn.Linear(4, 1, bias=False).double()
    enc = BorrowedWeightBias(owner)
    assert list(enc.parameters()) == []
    q, k, v = (torch.randn(2, 2, 13, 4, dtype=F64, requires_grad=True) for _ in range(3))
    pos = torch.arange(13)
    out = blockwise_softmax_attention(q, k, v, positional=enc, block_size=4)
    got = torch.autograd.grad(out.square().sum(), [q, owner.weight])
    ref = softmax_attention(q, k, v, bias=enc(q, pos, pos), scale=0.5)
    want = torch.autograd.grad(ref.square().sum(), [q, owner.weight])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    assert owner.weight.grad is None  # autograd.grad returned it, nothing accumulated


def test_fp32_fused_path_and_no_double_backward():
    """fp32 (the fused CPU kernel's forward and, for ALiBi, its backward) = materialised to fp32
    rounding; a second-order gradient is refused."""
    torch.manual_seed(2)
    for enc in (ALiBi(n_heads=4), T5RelativeBias(n_heads=4)):
        q, k, v = (torch.randn(2, 4, 40, 8, requires_grad=True) for _ in range(3))
        pos = torch.arange(40)
        out = blockwise_softmax_attention(q, k, v, positional=enc, block_size=16)
        ref = softmax_attention(q, k, v, bias=enc(q, pos, pos))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        params = [q, k, v, *enc.parameters()]
        got = torch.autograd.grad(out.square().sum(), params)
        want = torch.autograd.grad(ref.square().sum(), params)
        for g, r in zip(got, want, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    out = blockwise_softmax_attention(q, k, v, positional=enc, block_size=16)
    (gq,) = torch.autograd.grad(out.sum(), [q], create_graph=True)
    with pytest.raises(RuntimeError):
        gq.sum().backward()


class _CountBackward(torch.autograd.Function):
    """Identity that counts its backward calls."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class SharedTableBias(LogitBias):
    """A bias whose rows read one per-call table (like XL's W_R R or DeBERTa's p2c table)."""

    def __init__(self, h: int, m: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(h, m, dtype=F64))

    def forward(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return self.bias_rows(q, q_positions, k_positions)(0, q.shape[2])

    def bias_rows(self, q, q_positions, k_positions, *, k=None):
        shared = _CountBackward.apply(self.table * 2.0)  # per-call work, (h, m)

        def rows(i0: int, i1: int) -> Tensor:
            w = (q_positions[..., i0:i1, None] % 3).to(q.dtype)  # (rows, 1)
            return (w * shared[:, None, :])[None]  # (1, h, rows, m)

        return rows


def test_per_call_work_is_back_propagated_once():
    """Five blocks read one shared table: its backward runs once (the blocks' gradients are
    summed at its edge), and the table's gradient equals the materialised path's."""
    torch.manual_seed(3)
    enc = SharedTableBias(2, 11)
    q, k, v = (torch.randn(1, 2, 11, 4, dtype=F64, requires_grad=True) for _ in range(3))
    pos = torch.arange(11)
    _CountBackward.calls = 0
    out = blockwise_softmax_attention(q, k, v, positional=enc, block_size=3)
    got = torch.autograd.grad(out.square().sum(), [q, enc.table])
    assert _CountBackward.calls == 1
    ref = softmax_attention(q, k, v, bias=enc(q, pos, pos))
    want = torch.autograd.grad(ref.square().sum(), [q, enc.table])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
