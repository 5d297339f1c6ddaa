"""Transformer-XL's skewed bias rows (``functional.transformer_xl_blockwise``) inside the
exact blockwise kernel equal the materialised ``transformer_xl_bias`` (a gather over the
distance table) in fp64: outputs and gradients to q, k, v, W_R, u and v; causal and
bidirectional, a memory (m > n), per-sample offsets, padding, clamp_len that clips nothing,
any block size; and where the skew does not apply the gather path takes over."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import transformer_zoo.functional.transformer_xl_blockwise as skew_module
import transformer_zoo.positional.transformer_xl as xl_module
from transformer_zoo import TransformerXLRelativePosition
from transformer_zoo.functional import softmax_attention
from transformer_zoo.functional.softmax_blockwise import blockwise_softmax_attention
from transformer_zoo.functional.transformer_xl_blockwise import transformer_xl_skewed_rows

F64 = torch.float64


def _setup(b, h, n, m, d, seed, clamp_len=None):
    torch.manual_seed(seed)
    pe = TransformerXLRelativePosition(d_model=6, n_heads=h, head_dim=d, init_std=0.5,
                                       clamp_len=clamp_len).double()
    g = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=F64).requires_grad_()
               for length in (n, m, m))
    return pe, q, k, v


def _grads(out, q, k, v, pe):
    weights = torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)
    inputs = [q, k, v, pe.r_proj.weight, pe.u, pe.v]
    return [out, *torch.autograd.grad((out * weights).sum(), inputs)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), mem=st.integers(0, 6), b=st.integers(1, 2),
       causal=st.booleans(), offsets=st.booleans(), pad=st.booleans(), clamp=st.booleans(),
       rows=st.integers(1, 5), chunk=st.sampled_from([2, 3, 1024]),
       seed=st.integers(0, 2**16))
def test_skewed_rows_equal_the_materialised_bias(n, mem, b, causal, offsets, pad, clamp, rows,
                                                 chunk, seed):
    """Also with the table and its gradient in chunks of 2 or 3 distances (a block's window
    then spans several: built, dropped and flushed as the blocks move)."""
    default = skew_module.CHUNK
    skew_module.CHUNK = chunk
    try:
        _check_skewed(n, mem, b, causal, offsets, pad, clamp, rows, seed)
    finally:
        skew_module.CHUNK = default


def _check_skewed(n, mem, b, causal, offsets, pad, clamp, rows, seed):
    m = n + mem
    pe, q, k, v = _setup(b, 2, n, m, 3, seed, clamp_len=100 if clamp else None)
    qpos, kpos = torch.arange(n) + mem, torch.arange(m)
    if offsets:  # each sample its own offset (as packed or shifted sequences)
        shift = torch.arange(b)[:, None] * 5 - 2
        qpos, kpos = qpos + shift, kpos + 3 * shift
    mask = None
    if pad and m > 1:
        mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
        mask[0, ..., : m // 2] = False  # left padding of the keys in sample 0
    assert transformer_xl_skewed_rows(
        q, k, u=pe.u, v=pe.v, r_weight=pe.r_proj.weight, q_positions=qpos, k_positions=kpos,
        clamp_len=pe.clamp_len, base=pe.base, scale=3 ** -0.5) is not None
    got = _grads(blockwise_softmax_attention(q, k, v, positional=pe, q_positions=qpos,
                                             k_positions=kpos, mask=mask, causal=causal,
                                             block_size=rows), q, k, v, pe)
    bias = pe(q, qpos, kpos, k=k)
    want = _grads(softmax_attention(q, k, v, bias=bias, mask=mask, causal=causal), q, k, v, pe)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_rows_equal_forward_rows_and_have_their_own_graph():
    pe, q, k, _ = _setup(2, 2, 7, 11, 3, 0)
    qpos, kpos = torch.arange(7) + 4, torch.arange(11)
    rows = pe.bias_rows(q, qpos, kpos, k=k)
    full = pe(q, qpos, kpos, k=k)
    for i0, i1 in [(0, 1), (0, 3), (3, 7), (6, 7)]:
        got = rows(i0, i1)
        assert type(got.grad_fn).__name__ == "_RowsBackward"  # the skewed path, no gather
        torch.testing.assert_close(got, full[:, :, i0:i1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("case", ["gaps", "clipped", "one step of two"])
def test_the_skew_declines_where_it_does_not_apply(case):
    pe, q, k, _ = _setup(1, 2, 5, 5, 3, 0, clamp_len=2 if case == "clipped" else None)
    qpos = kpos = torch.arange(5)
    if case == "gaps":
        qpos = kpos = torch.arange(5) * 2
    if case == "one step of two":
        kpos = torch.tensor([0, 1, 2, 4, 5])
    assert transformer_xl_skewed_rows(
        q, k, u=pe.u, v=pe.v, r_weight=pe.r_proj.weight, q_positions=qpos, k_positions=kpos,
        clamp_len=pe.clamp_len, base=pe.base, scale=1.0) is None
    rows = pe.bias_rows(q, qpos, kpos, k=k)  # the gather (or per-block forward) path
    torch.testing.assert_close(rows(1, 4), pe(q, qpos, kpos, k=k)[:, :, 1:4], rtol=0,
                               atol=1e-13)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    """The per-call sums are handed out and reset by each backward: a second backward over a
    retained graph sums afresh (not on top of the first)."""
    pe, q, k, v = _setup(1, 2, 6, 6, 3, 0)
    out = blockwise_softmax_attention(q, k, v, positional=pe, block_size=2)
    loss = out.square().sum()
    first = torch.autograd.grad(loss, [q, k, pe.r_proj.weight, pe.u, pe.v], retain_graph=True)
    second = torch.autograd.grad(loss, [q, k, pe.r_proj.weight, pe.u, pe.v])
    for a, c in zip(first, second, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_a_subset_of_gradients_and_a_frozen_encoding():
    pe, q, k, v = _setup(1, 2, 6, 8, 3, 0)
    qpos = torch.arange(6) + 2
    out = blockwise_softmax_attention(q, k, v, positional=pe, block_size=4, causal=True,
                                      q_positions=qpos)
    want = torch.autograd.grad(softmax_attention(q, k, v, bias=pe(q, qpos,
                                                                 torch.arange(8), k=k),
                                                 causal=True).sum(), [q])
    torch.testing.assert_close(torch.autograd.grad(out.sum(), [q]), want, rtol=1e-10,
                               atol=1e-10)
    pe.requires_grad_(False)
    out = blockwise_softmax_attention(q, k, v, positional=pe, block_size=4, causal=True)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and pe.u.grad is None


def test_dropout_path_equals_the_gather_path(monkeypatch):
    """With dropout the blocks are checkpointed (the autograd engine, not the kernel, runs the
    rows' backward): the skewed rows give the gather path's outputs and gradients, dropout
    masks included (the same seed, the same draws)."""
    results = []
    for skew in (True, False):
        if not skew:
            monkeypatch.setattr(xl_module, "transformer_xl_skewed_rows", lambda *a, **kw: None)
        pe, q, k, v = _setup(2, 2, 7, 9, 3, 0)
        torch.manual_seed(5)
        out = blockwise_softmax_attention(q, k, v, positional=pe, block_size=3, dropout_p=0.3,
                                          q_positions=torch.arange(7) + 2)
        results.append(_grads(out, q, k, v, pe))
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_table_is_built_in_chunks_and_one_table_serves_equal_offsets(monkeypatch):
    monkeypatch.setattr(skew_module, "CHUNK", 4)
    pe, q, k, v = _setup(3, 2, 6, 9, 3, 0)
    kpos = torch.arange(9).expand(3, 9)
    rows = transformer_xl_skewed_rows(
        q, k, u=pe.u, v=pe.v, r_weight=pe.r_proj.weight, q_positions=torch.arange(6) + 3,
        k_positions=kpos, clamp_len=None, base=pe.base, scale=3 ** -0.5)
    sums = rows(0, 1).grad_fn.next_functions[0][0]  # the shared node
    assert sums is not None
    got = _grads(blockwise_softmax_attention(q, k, v, positional=pe, k_positions=kpos,
                                             q_positions=torch.arange(6) + 3, block_size=2),
                 q, k, v, pe)
    bias = pe(q, torch.arange(6) + 3, kpos, k=k)
    want = _grads(softmax_attention(q, k, v, bias=bias), q, k, v, pe)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
