"""Bad input across the public API raises ValueError/TypeError naming what was expected and
what came: wrong ranks, shape mismatches, non-bool masks, masks of the wrong shape,
dtype/device mismatch between inputs and parameters, empty batch, zero-length sequences.

Every exported attention (no encoding), the encoder with every attention × encoding pair,
every attention kernel and every positional encoding are walked; each case lists message
fragments that must appear (the expected and the received value).
"""

from __future__ import annotations

import pytest
import torch
from reliability_cases import (
    SMALL,
    attention_classes,
    attention_kernels,
    encoder_config,
    encoding_classes,
    kernel_case,
    make_attention,
    make_encoding,
    pair_id,
    pairs,
)

from transformer_zoo import Encoder, Place


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads spin against each other on a loaded
    2-core machine and run these sizes up to 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


B, N, D = 2, 5, SMALL.d_model
BOOL = torch.bool


def x(*shape, **kw):
    return torch.randn(*(shape or (B, N, D)), **kw)


def ones(*shape, dtype=BOOL, **kw):
    return torch.ones(*shape, dtype=dtype, **kw)


# (id, call(module), exception, fragments that must appear in the message)
MODULE_CASES = [
    ("x-not-tensor", lambda m: m([[0.0] * D]), TypeError, ["Tensor", "list"]),
    ("x-rank-2", lambda m: m(x(N, D)), ValueError, ["3-D", f"({N}, {D})"]),
    ("x-rank-4", lambda m: m(x(1, B, N, D)), ValueError, ["3-D", f"(1, {B}, {N}, {D})"]),
    ("x-width", lambda m: m(x(B, N, D + 1)), ValueError, [f"{D}", f"({B}, {N}, {D + 1})"]),
    ("x-int", lambda m: m(ones(B, N, D, dtype=torch.int64)), TypeError,
     ["floating", "int64"]),
    ("x-float64", lambda m: m(x(dtype=torch.float64)), TypeError, ["float64", "float32"]),
    ("x-device", lambda m: m(x(device="meta")), ValueError, ["meta", "cpu"]),
    ("empty-batch", lambda m: m(x(0, N, D)), ValueError, ["non-empty", f"(0, {N}, {D})"]),
    ("seq-0", lambda m: m(x(B, 0, D)), ValueError, ["non-empty", f"({B}, 0, {D})"]),
    ("mask-float", lambda m: m(x(), mask=torch.ones(B, N)), TypeError, ["bool", "float32"]),
    ("mask-long", lambda m: m(x(), mask=ones(B, N, dtype=torch.int64)), TypeError,
     ["bool", "int64"]),
    ("mask-shape", lambda m: m(x(), mask=ones(B, N + 1)), ValueError,
     [f"({B}, {N})", f"({B}, {N + 1})"]),
    ("mask-rank", lambda m: m(x(), mask=ones(B, 1, N)), ValueError,
     [f"({B}, {N})", f"({B}, 1, {N})"]),
    ("mask-device", lambda m: m(x(), mask=ones(B, N, device="meta")), ValueError,
     ["meta", "cpu"]),
    ("positions-int32", lambda m: m(x(), positions=torch.arange(N, dtype=torch.int32)),
     TypeError, ["int64", "int32"]),
    ("positions-float", lambda m: m(x(), positions=torch.arange(N) * 1.0), TypeError,
     ["int64", "float32"]),
    ("positions-shape", lambda m: m(x(), positions=torch.arange(N + 1)), ValueError,
     [f"({N},)", f"({N + 1},)"]),
    ("positions-batch", lambda m: m(x(), positions=torch.arange(N).expand(B + 1, N)),
     ValueError, [f"({B}, {N})", f"({B + 1}, {N})"]),
]

ATTENTION_ONLY = [
    ("context-width", lambda m: m(x(), context=x(B, N, D + 1)), ValueError,
     [f"({B}, {N}, {D + 1})"]),
    ("context-batch", lambda m: m(x(), context=x(B + 1, N, D)), ValueError,
     [f"({B + 1}, {N}, {D})"]),
    ("context-empty", lambda m: m(x(), context=x(B, 0, D)), ValueError, ["0"]),
    ("context-float64", lambda m: m(x(), context=x(dtype=torch.float64)), TypeError,
     ["context", "float64", "float32"]),
    ("context-int", lambda m: m(x(), context=ones(B, N, D, dtype=torch.int64)), TypeError,
     ["context", "floating", "int64"]),
    ("context-device", lambda m: m(x(), context=x(device="meta")), ValueError,
     ["context", "meta", "cpu"]),
    # kernels without n × m logits (Performer, Nyström) reject attn_mask outright
    ("attn-mask-float", lambda m: m(x(), attn_mask=torch.ones(N, N)), (TypeError, ValueError),
     ["attn_mask"]),
    ("attn-mask-shape", lambda m: m(x(), attn_mask=ones(N, N + 1)), ValueError,
     ["attn_mask"]),
    ("attn-mask-rank-5", lambda m: m(x(), attn_mask=ones(1, 1, 1, N, N)), ValueError,
     ["attn_mask"]),
]


def _check(call, module, exc, fragments):
    with pytest.raises(exc) as err:
        call(module)
    msg = str(err.value)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"


@pytest.mark.cpu_only
@pytest.mark.parametrize("case", MODULE_CASES + ATTENTION_ONLY, ids=lambda c: c[0])
@pytest.mark.parametrize("cls", attention_classes(), ids=lambda c: c.__name__)
def test_attention_rejects_bad_input(cls, case):
    _, call, exc, fragments = case
    _check(call, make_attention(cls), exc, fragments)


@pytest.mark.cpu_only
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_encoder_rejects_bad_input(pair):
    enc = Encoder(encoder_config(*pair))
    for _, call, exc, fragments in MODULE_CASES:
        _check(call, enc, exc, fragments)


def _qkv(b=B, h=2, n=N, m=N, d=8, **kw):
    return torch.randn(b, h, n, d, **kw), torch.randn(b, h, m, d, **kw), torch.randn(b, h, m, d)


KERNEL_CASES = [
    ("q-rank-3", lambda f: f(torch.randn(B, N, 8), *_qkv()[1:], None, False), ValueError,
     ["4-D", f"({B}, {N}, 8)"]),
    ("head-dim", lambda f: f(_qkv()[0], _qkv(d=4)[1], _qkv()[2], None, False), ValueError,
     ["8", "4"]),
    ("batch", lambda f: f(_qkv()[0], *_qkv(b=B + 1)[1:], None, False), ValueError,
     [f"({B}, 2, {N}, 8)", f"({B + 1}, 2, {N}, 8)"]),
    ("dtype", lambda f: f(_qkv()[0], _qkv(dtype=torch.float64)[1], _qkv()[2], None, False),
     TypeError, ["float32", "float64"]),
    ("int", lambda f: f(*(t.long() for t in _qkv()), None, False), TypeError,
     ["floating", "int64"]),
    ("mask-float", lambda f: f(*_qkv(), torch.ones(B, N), False), TypeError,
     ["bool", "float32"]),
    ("mask-shape", lambda f: f(*_qkv(), ones(B, N + 1), False), ValueError,
     [f"{N + 1}"]),
    ("empty-batch", lambda f: f(*_qkv(b=0), None, False), ValueError, ["non-empty", "(0,"]),
    ("empty-seq", lambda f: f(*_qkv(n=0), None, False), ValueError, ["non-empty", ", 0, "]),
    ("empty-keys", lambda f: f(*_qkv(m=0), None, False), ValueError, ["non-empty", ", 0, "]),
]


@pytest.mark.cpu_only
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("name", attention_kernels())
def test_attention_kernel_rejects_bad_input(name, case):
    _, call, exc, fragments = case
    _check(call, kernel_case(name).attend, exc, fragments)


def _encoding_cases(place: Place):
    pos, bad = torch.arange(N), torch.arange(N) * 1.0
    q = torch.randn(B, SMALL.n_heads, N, SMALL.head_dim)
    if place is Place.INPUT:
        return [
            (lambda pe: pe(bad), TypeError, ["int64", "float32"]),
            (lambda pe: pe(pos.int()), TypeError, ["int64", "int32"]),
        ]
    if place is Place.QK:
        return [
            (lambda pe: pe(q, q, bad, pos), TypeError, ["int64", "float32"]),
            (lambda pe: pe(q[0], q[0], pos, pos), ValueError, ["4-D"]),
        ]
    def bias(pe, qp, kp):  # encodings with needs_keys also take the keys
        return pe(q, qp, kp, k=q) if getattr(pe, "needs_keys", False) else pe(q, qp, kp)

    return [
        (lambda pe: bias(pe, bad, pos), TypeError, ["int64", "float32"]),
        (lambda pe: bias(pe, pos, pos.int()), TypeError, ["int64", "int32"]),
    ]


@pytest.mark.parametrize("cls", encoding_classes(), ids=lambda c: c.__name__)
def test_encoding_rejects_bad_positions(cls):
    pe = make_encoding(cls)
    for call, exc, fragments in _encoding_cases(cls.place):
        _check(call, pe, exc, fragments)
