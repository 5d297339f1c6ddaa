"""Fuzzing ``EncoderConfig``: attention, encoding (shared instance or per-layer factory),
norm placement, feed-forward, sizes, dropout, causal, masks (incl. a fully padded sample),
positions (offsets, per-sample), train/eval. Every draw either builds and runs forward +
backward with finite outputs and gradients (padded positions exactly 0), or raises the
documented ValueError at construction: an attention × encoding pair the kernel does not
accept, or ``causal=True`` for a kernel without a causal form. Never another exception.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_cases import (
    Sizes,
    attention_classes,
    attention_factory,
    encoding_classes,
    make_encoding,
)

from transformer_zoo import Encoder, EncoderConfig, FeedForward, SwiGLUFeedForward, supports


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (see test_reliability_compile.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def fuzz_cases(draw) -> dict[str, Any]:
    n_heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 8]))
    d_model = n_heads * head_dim
    return dict(
        attention=draw(st.sampled_from(attention_classes())),
        encoding=draw(st.sampled_from([None, *encoding_classes()])),
        shared_encoding=draw(st.booleans()),
        sizes=Sizes(d_model=d_model, n_heads=n_heads, head_dim=head_dim, max_len=64),
        n_layers=draw(st.integers(1, 2)),
        d_ff=draw(st.sampled_from([None, d_model, 3 * d_model])),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
        attention_dropout=draw(st.sampled_from([0.0, 0.2])),
        norm_first=draw(st.booleans()),
        causal=draw(st.booleans()),
        feedforward=draw(st.sampled_from([FeedForward, SwiGLUFeedForward])),
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, 8)),
        masking=draw(st.sampled_from(["none", "padding", "empty-sample"])),
        positions=draw(st.sampled_from(["default", "offset", "per-sample"])),
        train=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def expected_rejection(case: dict[str, Any]) -> bool:
    att, enc = case["attention"], case["encoding"]
    return (enc is not None and not supports(att, enc)) or (
        case["causal"] and not att.supports_causal
    )


def run_case(case: dict[str, Any]) -> str:
    """'ok' or 'rejected' (the documented ValueError); anything else raises."""
    s, enc_cls = case["sizes"], case["encoding"]
    positional = None
    if enc_cls is not None:
        positional = (make_encoding(enc_cls, s) if case["shared_encoding"]
                      else (lambda: make_encoding(enc_cls, s)))
    torch.manual_seed(case["seed"])
    try:
        model = Encoder(EncoderConfig(
            d_model=s.d_model, n_heads=s.n_heads, n_layers=case["n_layers"], d_ff=case["d_ff"],
            dropout=case["dropout"], attention_dropout=case["attention_dropout"],
            norm_first=case["norm_first"], causal=case["causal"],
            attention=attention_factory(case["attention"]), feedforward=case["feedforward"],
            positional=positional,
        ))
    except ValueError as err:
        if not expected_rejection(case):
            raise
        msg = str(err)
        assert case["attention"].__name__ in msg, msg
        return "rejected"
    assert not expected_rejection(case), "an incompatible configuration was accepted"

    b, n = case["batch"], case["seq"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(b, n, s.d_model, generator=g, requires_grad=True)
    mask = None
    if case["masking"] != "none":
        lengths = torch.randint(1, n + 1, (b,), generator=g)
        if case["masking"] == "empty-sample":
            lengths[-1] = 0
        mask = torch.arange(n)[None, :] < lengths[:, None]
    positions = None
    if case["positions"] == "offset":
        positions = torch.arange(n) + 17
    elif case["positions"] == "per-sample":
        positions = torch.arange(n)[None, :] + torch.randint(0, 40, (b, 1), generator=g)
    model.train(case["train"])
    out = model(x, mask=mask, positions=positions)
    assert out.shape == (b, n, s.d_model)
    assert torch.isfinite(out).all()
    if mask is not None:
        assert (out[~mask] == 0).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    return "ok"


@pytest.mark.cpu_only
@settings(max_examples=60)
@given(case=fuzz_cases())
def test_encoder_config_fuzz(case):
    assert run_case(case) in {"ok", "rejected"}
