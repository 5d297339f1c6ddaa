"""Shaw et al. relative positions inside softmax attention equal the paper's equations,
written as a slow loop over (i, j) in fp64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo import ShawRelativePosition, SoftmaxAttention


def slow_shaw(q, k, v, a_k, a_v, qp, kp, clip, allowed):
    """e_ij = q_i·(k_j + a^K_r)/√d, o_i = Σ_j α_ij (v_j + a^V_r), r = clip(j − i) + k."""
    b, h, n, d = q.shape
    m = k.shape[2]
    out = torch.zeros(b, h, n, d, dtype=q.dtype)
    for bi in range(b):
        for i in range(n):
            r = [max(-clip, min(clip, int(kp[j] - qp[i]))) + clip for j in range(m)]
            e = torch.stack([(q[bi, :, i] * (k[bi, :, j] + a_k[r[j]])).sum(-1) / math.sqrt(d)
                             for j in range(m)], -1)  # (h, m)
            e = e.masked_fill(~allowed[bi, i], float("-inf"))
            alpha = torch.softmax(e, -1)
            for j in range(m):
                out[bi, :, i] += alpha[:, j, None] * (v[bi, :, j] + a_v[r[j]])
    return out


@given(n=st.integers(1, 6), clip=st.integers(1, 4), causal=st.booleans(),
       offset=st.integers(0, 50), pad=st.integers(0, 2))
def test_matches_slow_reference(n, clip, causal, offset, pad):
    d, h = 4, 2
    pe = ShawRelativePosition(head_dim=d, max_distance=clip, init_std=0.5).double()
    attn = SoftmaxAttention(h * d, h, causal=causal, positional=pe).double()
    x = torch.randn(2, n, h * d, dtype=torch.float64)
    pos = torch.arange(n) + offset
    mask = torch.ones(2, n, dtype=torch.bool)
    n_pad = min(pad, n - 1)  # keep one real key per row
    if n_pad:
        mask[1, n - n_pad :] = False
    got = attn(x, mask=mask, positions=pos)
    q = attn.q_proj(x).view(2, n, h, d).transpose(1, 2)
    k, v = attn.kv_proj(x).view(2, n, 2, h, d).permute(2, 0, 3, 1, 4)
    allowed = mask[:, None, :].expand(2, n, n).clone()
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    ref = slow_shaw(q, k, v, pe.key_embedding, pe.value_embedding, pos, pos, clip, allowed)
    want = attn.out_proj(ref.transpose(1, 2).reshape(2, n, h * d))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_cross_attention_positions_and_shapes():
    pe = ShawRelativePosition(head_dim=8, max_distance=3)
    q = torch.randn(2, 4, 5, 8)
    bias = pe(q, torch.arange(5), torch.arange(7) + 2)
    assert bias.shape == (2, 4, 5, 7)
    weights = torch.softmax(torch.randn(2, 4, 5, 7), -1)
    term = pe.value_term(weights, torch.arange(5), torch.arange(7) + 2)
    assert term.shape == (2, 4, 5, 8)
    # far keys share the clipped embedding: a row of weights all at distance >= 3 gives a^V_2k
    far = torch.zeros(1, 1, 1, 4)
    far[..., 1] = 1.0
    out = pe.value_term(far, torch.tensor([0]), torch.tensor([10, 20, 30, 40]))
    torch.testing.assert_close(out[0, 0, 0], pe.value_embedding[6])


def test_batched_positions_equal_per_row():
    pe = ShawRelativePosition(head_dim=4, max_distance=2)
    q = torch.randn(2, 3, 5, 4)
    qp = torch.stack((torch.arange(5), torch.tensor([0, 1, 2, 0, 1])))  # row 2: packed reset
    kp = torch.stack((torch.arange(6) + 1, torch.arange(6)))
    bias = pe(q, qp, kp)
    weights = torch.softmax(torch.randn(2, 3, 5, 6), -1)
    term = pe.value_term(weights, qp, kp)
    for i in range(2):
        torch.testing.assert_close(bias[i : i + 1], pe(q[i : i + 1], qp[i], kp[i]))
        torch.testing.assert_close(term[i : i + 1], pe.value_term(weights[i : i + 1], qp[i], kp[i]))


def test_gradcheck_and_validation():
    pe = ShawRelativePosition(head_dim=2, max_distance=2).double()
    attn = SoftmaxAttention(4, 2, positional=pe).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t), (x,))
    with pytest.raises(ValueError, match="head_dim=2"):
        SoftmaxAttention(8, 2, positional=ShawRelativePosition(head_dim=2))(torch.randn(1, 3, 8))
    with pytest.raises(TypeError):
        ShawRelativePosition(2)  # type: ignore[misc]
    assert set(pe.state_dict()) == {"key_embedding", "value_embedding"}


def test_dropout_hits_values_and_value_term_alike():
    """With attention dropout the value term uses the same dropped weights as the values
    (Shaw et al.; tensor2tensor): with v_j = c and every a^V_r = c the head output is
    2·Σ_j α̃_ij c, i.e. twice the output with a^V = 0 under the same dropout mask."""
    d, h, n = 4, 2, 6
    pe = ShawRelativePosition(head_dim=d, max_distance=2)
    attn = SoftmaxAttention(h * d, h, dropout=0.5, positional=pe).train()
    q, k = torch.randn(1, h, n, d), torch.randn(1, h, n, d)
    c = torch.randn(d)
    v = c.expand(1, h, n, d)
    pos = torch.arange(n)
    kw = dict(key_padding_mask=None, attn_mask=None, q_positions=pos, k_positions=pos)
    with torch.no_grad():
        pe.value_embedding.copy_(c.expand_as(pe.value_embedding))
        torch.manual_seed(3)
        both = attn.attend(q, k, v, **kw)
        pe.value_embedding.zero_()
        torch.manual_seed(3)
        values_only = attn.attend(q, k, v, **kw)
    assert not torch.allclose(values_only, c.expand_as(values_only))  # dropout did act
    torch.testing.assert_close(both, 2 * values_only)
