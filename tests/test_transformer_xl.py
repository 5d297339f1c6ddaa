"""Transformer-XL relative attention (Dai et al. 2019, arXiv 1901.02860, §3.3) equals the
paper's four-term formula (a slow loop over (i, j) in fp64), the reference code's form
(kimiyoung/transformer-xl ``RelPartialLearnableMultiHeadAttn``: AC + BD with ``_rel_shift``,
re-written here from its description, with a memory) and Hugging Face's XLNet
``XLNetRelativeAttention.rel_attn_core`` (the same form, bidirectional and causal) on shared
weights; plus properties: translation invariance, causality, row blocks, gradients, padding,
encoder composition with u, v shared across layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    NystromAttention,
    PerformerAttention,
    SoftmaxAttention,
    TransformerXLRelativePosition,
)
from transformer_zoo.functional import (
    relative_distance_table,
    softmax_attention,
    transformer_xl_bias,
    transformer_xl_sinusoid,
)

F64 = torch.float64


def _encoding(d_model=8, h=2, d=4, seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerXLRelativePosition(d_model=d_model, n_heads=h, head_dim=d, init_std=0.5,
                                         **kw).double()


def _qk(b, h, n, m, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=F64),
            torch.randn(b, h, m, d, generator=g, dtype=F64))


# -- oracle 1: the paper's formula, term by term ---------------------------------------------
def paper_logits(q, k, u, v, w_r, width, qpos, kpos, clamp_len=None):
    """A^rel_ij = [q_iᵀk_j + q_iᵀW_R R_{i−j} + uᵀk_j + vᵀW_R R_{i−j}] / √d, R_r the sinusoid
    [sin(r/10000^(2f/D))_f, cos(r/10000^(2f/D))_f] (the reference code's layout)."""
    b, h, n, d = q.shape
    m = k.shape[2]
    qpos, kpos = qpos.expand(b, n), kpos.expand(b, m)
    w = w_r.view(h, d, width)  # W_R per head
    out = torch.empty(b, h, n, m, dtype=F64)
    cache: dict[int, torch.Tensor] = {}
    for bi in range(b):
        for i in range(n):
            for j in range(m):
                r = int(qpos[bi, i]) - int(kpos[bi, j])
                if clamp_len is not None:
                    r = max(-clamp_len, min(clamp_len, r))
                if r not in cache:
                    freqs = [r / 10000 ** (2 * f / width) for f in range(width // 2)]
                    cache[r] = torch.tensor([math.sin(a) for a in freqs]
                                            + [math.cos(a) for a in freqs], dtype=F64)
                wr = w @ cache[r]  # (h, d): W_R R_{i−j}
                qi, kj = q[bi, :, i], k[bi, :, j]
                out[bi, :, i, j] = ((qi * kj).sum(-1) + (qi * wr).sum(-1) + (u * kj).sum(-1)
                                    + (v * wr).sum(-1)) / math.sqrt(d)
    return out


def ours_logits(pe, q, k, qpos, kpos):
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + pe(q, qpos, kpos, k=k)


@given(n=st.integers(1, 5), extra=st.integers(0, 4), offset=st.integers(-20, 20),
       batched=st.booleans(), gaps=st.booleans(), clamp=st.sampled_from([None, 1, 3]))
def test_bias_equals_the_papers_formula(n, extra, offset, batched, gaps, clamp):
    """Any positions: offsets, cross lengths m ≠ n, per-sample positions, positions with gaps
    (the distinct-distance fallback), negative distances, clamp_len."""
    m = n + extra
    pe = _encoding(clamp_len=clamp)
    q, k = _qk(2, 2, n, m, 4)
    step = 3 if gaps else 1
    qpos = torch.arange(n) * step + offset
    kpos = torch.arange(m) * step
    if batched:
        qpos = torch.stack([qpos, qpos.flip(0) + 7])
        kpos = torch.stack([kpos, kpos + 2])
    want = paper_logits(q, k, pe.u, pe.v, pe.r_proj.weight, 8, qpos, kpos, clamp)
    torch.testing.assert_close(ours_logits(pe, q, k, qpos, kpos), want, rtol=1e-12,
                               atol=1e-12)


# -- oracle 2: the reference code's AC + BD with _rel_shift, with a memory ---------------------
def _rel_shift(x):
    """kimiyoung/transformer-xl ``_rel_shift`` on (qlen, rlen, ...): prepend a zero column,
    view as (rlen + 1, qlen, ...), drop the first row, view back: row i moves left by
    qlen − 1 − i, so column j holds distance index qlen − 1 − i + j."""
    zero = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    padded = torch.cat([zero, x], dim=1).view(x.shape[1] + 1, x.shape[0], *x.shape[2:])
    return padded[1:].view_as(x)


def reference_code_attention(x, mem, attn, pe, mlen):
    """``RelPartialLearnableMultiHeadAttn.forward`` in the reference code's (len, batch, head,
    dim) layout: keys over [mem; x], r = R(klen−1 … 0) through r_net (= W_R), AC = (q + u)·k,
    BD = rel_shift((q + v)·W_R R), score = (AC + BD)·scale, mask triu(1 + mlen), softmax, v,
    o_net. The projections are ``attn``'s (no biases)."""
    b, n, _ = x.shape
    h, d = attn.n_heads, attn.head_dim
    cat = torch.cat([mem, x], 1).transpose(0, 1)  # (klen, b, D)
    klen = cat.shape[0]
    wq = attn.q_proj(x.transpose(0, 1)).view(n, b, h, d)
    wk, wv = attn.kv_proj(cat).view(klen, b, 2, h, d).unbind(2)
    pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=F64)
    inv_freq = 1 / (10000 ** (torch.arange(0.0, pe.d_model, 2.0, dtype=F64) / pe.d_model))
    ang = torch.outer(pos_seq, inv_freq)
    r = torch.cat([ang.sin(), ang.cos()], -1)  # (rlen = klen, D)
    r_head_k = (r @ pe.r_proj.weight.T).view(klen, h, d)
    owner = pe.bias_owner
    ac = torch.einsum("ibnd,jbnd->ijbn", wq + owner.u, wk)
    bd = _rel_shift(torch.einsum("ibnd,jnd->ijbn", wq + owner.v, r_head_k))
    score = (ac + bd) / math.sqrt(d)
    masked = torch.triu(torch.ones(n, klen, dtype=torch.bool), diagonal=1 + mlen)
    score = score.masked_fill(masked[:, :, None, None], float("-inf"))
    prob = score.softmax(1)
    vec = torch.einsum("ijbn,jbnd->ibnd", prob, wv).reshape(n, b, h * d)
    return attn.out_proj(vec).transpose(0, 1)  # (b, n, D)


@pytest.mark.parametrize("mlen", [0, 1, 4])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_module_equals_the_reference_code_with_memory(mlen, n):
    """Queries at positions mlen … mlen+n−1 attend causally over [memory; segment] (keys at
    0 … klen−1): our SoftmaxAttention(causal=True) with ``context`` = [mem; x] and the
    positions given equals the reference code's relative attention to fp64 rounding."""
    torch.manual_seed(0)
    pe = TransformerXLRelativePosition(d_model=16, n_heads=2, head_dim=8, init_std=0.5)
    attn = SoftmaxAttention(16, 2, causal=True, bias=False, positional=pe).double()
    x, mem = torch.randn(2, n, 16, dtype=F64), torch.randn(2, mlen, 16, dtype=F64)
    got = attn(x, context=torch.cat([mem, x], 1), positions=torch.arange(mlen, mlen + n),
               context_positions=torch.arange(mlen + n))
    want = reference_code_attention(x, mem, attn, pe, mlen)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_rel_shift_logits_equal_ours_on_the_causal_region():
    """The (i, j ≤ i + mlen) entries of the reference code's AC + BD are our logits (the
    others are the shift's wrap-around, masked in the reference)."""
    pe = _encoding(d_model=8, h=2, d=4)
    n, mlen = 4, 3
    klen = n + mlen
    q, k = _qk(2, 2, n, klen, 4)
    pos_seq = torch.arange(klen - 1, -1, -1)
    r_head = (transformer_xl_sinusoid(pos_seq, 8, dtype=F64) @ pe.r_proj.weight.T).view(
        klen, 2, 4)
    wq, wk = q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3)
    ac = torch.einsum("ibnd,jbnd->ijbn", wq + pe.u, wk)
    bd = _rel_shift(torch.einsum("ibnd,jnd->ijbn", wq + pe.v, r_head))
    ref = ((ac + bd) / 2.0).permute(2, 3, 0, 1)  # (b, h, n, klen), 1/√4
    ours = ours_logits(pe, q, k, torch.arange(mlen, klen), torch.arange(klen))
    region = torch.ones(n, klen, dtype=torch.bool).tril(mlen)
    torch.testing.assert_close(ours[..., region], ref[..., region], rtol=1e-12, atol=1e-12)


# -- oracle 3: Hugging Face XLNet's relative attention core ------------------------------------
@pytest.mark.parametrize("attn_type", ["bi", "uni"])
@pytest.mark.parametrize("mlen", [0, 3])
@pytest.mark.parametrize("clamp_len", [None, 2])
def test_equals_hf_xlnet_rel_attn_core(attn_type, mlen, clamp_len):
    """XLNet uses Transformer-XL's form (arXiv 1906.08237): HF's ``rel_attn_core`` (AC + BD,
    ``rel_shift_bnij``, no segments) with its W_R (``r``), r_w_bias = u, r_r_bias = v, and R
    from its ``positional_embedding`` over klen … −qlen+1 ("bi") or klen … 0 ("uni", with
    its causal mask) equals softmax(q·k/√d + our bias)·v in fp64, to rounding."""
    pytest.importorskip("transformers")
    from transformers import XLNetConfig
    from transformers.models.xlnet.modeling_xlnet import XLNetModel, XLNetRelativeAttention

    b, h, d, width, n = 2, 2, 4, 8, 5
    klen = n + mlen
    torch.manual_seed(0)
    hf = XLNetRelativeAttention(XLNetConfig(d_model=width, n_head=h, d_head=d,
                                            dropout=0.0)).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)
    q, k = _qk(b, h, n, klen, d)
    v = torch.randn(b, h, klen, d, dtype=F64)
    end = -n if attn_type == "bi" else -1
    pos_seq = torch.arange(klen, end, -1).to(F64)
    if clamp_len is not None:
        pos_seq = pos_seq.clamp(-clamp_len, clamp_len)
    inv_freq = 1 / torch.pow(10000, torch.arange(0, width, 2, dtype=F64) / width)
    r = XLNetModel.positional_embedding(pos_seq, inv_freq, b)  # (rlen, b, D)
    k_head_r = torch.einsum("ibh,hnd->ibnd", r, hf.r)
    mask = None
    if attn_type == "uni":
        mask = torch.triu(torch.ones(n, klen, dtype=F64), diagonal=1 + mlen)[:, :, None, None]
    with torch.no_grad():
        want = hf.rel_attn_core(q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3),
                                v.permute(2, 0, 1, 3), k_head_r, attn_mask=mask)  # (n, b, h, d)
    pe = TransformerXLRelativePosition(d_model=width, n_heads=h, head_dim=d,
                                       clamp_len=clamp_len).double()
    with torch.no_grad():
        pe.r_proj.weight.copy_(hf.r.reshape(width, h * d).T)
        pe.u.copy_(hf.r_w_bias)
        pe.v.copy_(hf.r_r_bias)
        bias = pe(q, torch.arange(mlen, klen), torch.arange(klen), k=k)
        got = softmax_attention(q, k, v, bias=bias, causal=attn_type == "uni",
                                scale=d ** -0.5)
    torch.testing.assert_close(got, want.permute(1, 2, 0, 3), rtol=1e-12, atol=1e-12)


def test_sinusoid_equals_hf_xlnets_to_fp32_rounding():
    """R (fp64 angles) equals XLNet's own fp32 ``relative_positional_encoding`` table."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from transformers.models.xlnet.modeling_xlnet import XLNetModel

    fake = SimpleNamespace(d_model=32, attn_type="bi", bi_data=False, clamp_len=-1,
                           positional_embedding=XLNetModel.positional_embedding)
    want = XLNetModel.relative_positional_encoding(fake, 40, 100)[:, 0]  # distances 100 … −39
    got = transformer_xl_sinusoid(torch.arange(100, -40, -1), 32)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


# -- properties --------------------------------------------------------------------------------
@given(shift=st.integers(-10**6, 10**6), batched=st.booleans())
def test_translation_invariance(shift, batched):
    """Shifting every position by the same amount changes no bias entry."""
    pe = _encoding()
    q, k = _qk(2, 2, 4, 6, 4)
    qpos, kpos = torch.arange(2, 6), torch.arange(6)
    if batched:
        qpos, kpos = torch.stack([qpos, qpos + 9]), torch.stack([kpos, kpos + 9])
    base = pe(q, qpos, kpos, k=k)
    torch.testing.assert_close(pe(q, qpos + shift, kpos + shift, k=k), base, rtol=1e-13,
                               atol=1e-13)


@pytest.mark.parametrize("pos", ["arange", "gaps", "batched"])
def test_row_blocks_give_exactly_those_rows(pos):
    """forward on a block of query rows (and their positions) = those rows of the full bias
    (the blockwise kernels rely on it), to fp64 rounding: the same distances, the same
    values; only the matmul's blocking over a different table width may round differently."""
    pe = _encoding()
    n, m = 9, 11
    q, k = _qk(2, 2, n, m, 4)
    qpos, kpos = torch.arange(n) + 2, torch.arange(m)
    if pos == "gaps":
        qpos, kpos = qpos * 3, kpos * 2
    if pos == "batched":
        qpos, kpos = torch.stack([qpos, qpos.flip(0)]), torch.stack([kpos, kpos + 5])
    full = pe(q, qpos, kpos, k=k)
    for lo, hi in [(0, 4), (4, 9), (3, 4), (8, 9)]:
        part = pe(q[:, :, lo:hi], qpos[..., lo:hi], kpos, k=k)
        torch.testing.assert_close(part, full[:, :, lo:hi], rtol=0, atol=1e-14)


@pytest.mark.parametrize("norm_first", [True, False])
def test_causal_encoder_future_tokens_change_no_past_output(norm_first):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(
        d_model=16, n_heads=2, n_layers=2, dropout=0.0, causal=True, norm_first=norm_first,
        positional=TransformerXLRelativePosition.sharing_factory(n_layers=2, d_model=16,
                                                                 n_heads=2, head_dim=8),
    )).double().eval()
    x = torch.randn(2, 7, 16, dtype=F64)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 3, 16, dtype=F64)
    out_x, out_y = enc(x), enc(y)
    torch.testing.assert_close(out_x[:, :4], out_y[:, :4], rtol=1e-12, atol=1e-12)
    assert (out_x[:, 4:] - out_y[:, 4:]).abs().max() > 1e-3


def test_gradients_reach_w_r_u_v_and_pass_gradcheck():
    pe = _encoding()
    q, k = _qk(1, 2, 3, 4, 4)
    q.requires_grad_(True), k.requires_grad_(True)
    pe(q, torch.arange(3) + 1, torch.arange(4), k=k).square().sum().backward()
    for name, p in [("r_proj.weight", pe.r_proj.weight), ("u", pe.u), ("v", pe.v)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    def fn(q, k, u, v, w):
        return transformer_xl_bias(q, k, u=u, v=v, r_weight=w, q_positions=torch.arange(3),
                                   k_positions=torch.arange(4) - 1)

    args = [t.detach().clone().requires_grad_(True)
            for t in (q, k, pe.u, pe.v, pe.r_proj.weight)]
    assert torch.autograd.gradcheck(fn, args)


def test_padding_rows_are_zero_never_nan():
    """Encoder outputs at padded tokens are 0; a sample with every key padded gives 0."""
    torch.manual_seed(0)
    pe = TransformerXLRelativePosition(d_model=16, n_heads=2, head_dim=8)
    enc = Encoder(EncoderConfig(d_model=16, n_heads=2, n_layers=2, dropout=0.0,
                                positional=pe)).eval()
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = enc(torch.randn(2, 6, 16), mask=mask)
    assert torch.isfinite(out).all() and (out[1, 3:] == 0).all()
    attn = SoftmaxAttention(16, 2, positional=TransformerXLRelativePosition(
        d_model=16, n_heads=2, head_dim=8))
    none = torch.tensor([[True] * 5, [False] * 5])
    out = attn(torch.randn(2, 5, 16), mask=none)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], attn.out_proj.bias.expand(5, 16))  # 0 before o_proj


@pytest.mark.parametrize("causal", [False, True])
def test_encoder_shares_u_v_across_layers_once_in_state_dict(causal):
    """The paper's sharing: one u, v for all layers (in parameters() and state_dict once, under
    the first layer), a W_R per layer; loading, deepcopy and gradients respect it."""
    config = EncoderConfig(
        d_model=16, n_heads=2, n_layers=3, dropout=0.0, causal=causal,
        positional=TransformerXLRelativePosition.sharing_factory(n_layers=3, d_model=16,
                                                                 n_heads=2, head_dim=8),
    )
    torch.manual_seed(0)
    enc = Encoder(config)
    pes = [layer.attention.positional for layer in enc.layers]
    assert all(p.bias_owner is pes[0] for p in pes) and not pes[0].shares_biases
    assert len({id(p.r_proj.weight) for p in pes}) == 3
    keys = [key for key in enc.state_dict() if "positional" in key]
    assert sorted(k for k in keys if k.endswith((".u", ".v"))) == [
        "layers.0.attention.positional.u", "layers.0.attention.positional.v"]
    assert sum(k.endswith("r_proj.weight") for k in keys) == 3
    names = [n for n, _ in enc.named_parameters()]
    assert sum(n.endswith((".u", ".v")) for n in names) == 2
    x = torch.randn(2, 5, 16)
    enc.eval()
    twin = Encoder(config).eval()  # the same factory: the twin's own u, v
    assert twin.layers[1].attention.positional.bias_owner is twin.layers[0].attention.positional
    twin.load_state_dict(enc.state_dict())
    torch.testing.assert_close(twin(x), enc(x), rtol=0, atol=0)
    clone = copy.deepcopy(enc)
    cpes = [layer.attention.positional for layer in clone.layers]
    assert all(p.bias_owner is cpes[0] for p in cpes) and cpes[0].u is not pes[0].u
    # the shared v gets gradient from every layer: zeroing layer 0's W_R leaves it non-zero
    with torch.no_grad():
        pes[0].r_proj.weight.zero_()
    enc(x).square().sum().backward()
    assert pes[0].v.grad.abs().sum() > 0


def test_standalone_encodings_own_their_biases():
    a = TransformerXLRelativePosition(d_model=8, n_heads=2, head_dim=4)
    b = TransformerXLRelativePosition(d_model=8, n_heads=2, head_dim=4, share_biases_with=a)
    c = TransformerXLRelativePosition(d_model=8, n_heads=2, head_dim=4, share_biases_with=b)
    assert c.bias_owner is a and b.bias_owner is a
    assert set(dict(b.named_parameters())) == {"r_proj.weight"}
    assert set(dict(a.named_parameters())) == {"r_proj.weight", "u", "v"}


@pytest.mark.parametrize("attention", [PerformerAttention, NystromAttention])
def test_kernels_without_logits_refuse(attention):
    pe = TransformerXLRelativePosition(d_model=16, n_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=f"{attention.__name__}.*TransformerXLRelativePosition"):
        attention(16, 2, positional=pe)


def test_no_n_m_d_tensor_is_built():
    """Terms (b) + (d) go through the (b, h, n, T) per-distance scores: no intermediate has
    n·m·d elements per head (the (b, h, n, n + m − 1) scores are the largest)."""
    b, h, n, m, d = 1, 2, 24, 40, 16

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    pe = TransformerXLRelativePosition(d_model=32, n_heads=h, head_dim=d)
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, m, d)
    with Largest():
        pe(q, torch.arange(n) + m - n, torch.arange(m), k=k)
    assert Largest.largest <= b * h * n * (n + m - 1) < b * h * n * m * d


def test_distance_table():
    distances, index = relative_distance_table(torch.arange(3) + 5, torch.arange(4))
    r = (torch.arange(3)[:, None] + 5) - torch.arange(4)
    assert distances.shape == (1, 6) and torch.equal(distances[0, index[0]], r)
    distances, index = relative_distance_table(torch.arange(3) * 10, torch.arange(4))
    assert torch.equal(distances[0, index[0]], torch.arange(3)[:, None] * 10 - torch.arange(4))
    distances, index = relative_distance_table(torch.arange(3), torch.arange(9), clamp_len=2)
    assert distances.shape == (1, 5) and distances[0, index[0]].abs().max() == 2


def test_empty_queries_or_keys_give_empty_biases():
    pe = _encoding()
    for n, m in [(0, 3), (3, 0), (0, 0)]:
        q, k = _qk(1, 2, n, m, 4)
        assert pe(q, torch.arange(n), torch.arange(m), k=k).shape == (1, 2, n, m)


def test_gapped_positions_under_compile_raise():
    """Under torch.compile the table size is n + m − 1: gapped positions are refused."""
    pe = _encoding()
    q, k = _qk(1, 2, 3, 3, 4)
    compiled = torch.compile(lambda q, k, p: pe(q, p, p, k=k), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, torch.arange(3)), pe(q, torch.arange(3),
                                                                   torch.arange(3), k=k))
    with pytest.raises(RuntimeError, match="gaps"):
        compiled(q, k, torch.arange(3) * 5)


def test_validation_errors_name_the_problem():
    with pytest.raises(ValueError, match="even"):
        TransformerXLRelativePosition(d_model=7, n_heads=1, head_dim=7)
    with pytest.raises(ValueError, match="n_heads"):
        SoftmaxAttention(16, 4, positional=TransformerXLRelativePosition(
            d_model=16, n_heads=2, head_dim=8))
    a = TransformerXLRelativePosition(d_model=8, n_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="u, v"):
        TransformerXLRelativePosition(d_model=8, n_heads=2, head_dim=2, share_biases_with=a)
    with pytest.raises(TypeError, match="share_biases_with"):
        TransformerXLRelativePosition(d_model=8, n_heads=2, head_dim=4, share_biases_with=3)
    with pytest.raises(ValueError, match="head_dim=4"):
        a(torch.randn(1, 2, 3, 5), torch.arange(3), torch.arange(3), k=torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="k:"):
        a(torch.randn(1, 2, 3, 4), torch.arange(3), torch.arange(3), k=torch.randn(1, 2, 3, 3))
    with pytest.raises(TypeError, match="int64"):
        a(torch.randn(1, 2, 3, 4), torch.arange(3.0), torch.arange(3), k=torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="clamp_len"):
        TransformerXLRelativePosition(d_model=8, n_heads=2, head_dim=4, clamp_len=0)


def test_cached_decoding_equals_the_parallel_forward():
    """Encoder.prefill then step (keys from the cache as the memory, queries at their
    positions) = the parallel causal forward: the memory case through the KV cache."""
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(
        d_model=16, n_heads=2, n_layers=2, d_ff=24, dropout=0.0, causal=True,
        positional=TransformerXLRelativePosition.sharing_factory(n_layers=2, d_model=16,
                                                                 n_heads=2, head_dim=8),
    )).double().eval()
    x = torch.randn(2, 9, 16, dtype=F64)
    out, state = enc.prefill(x[:, :4])
    outs = [out]
    for t in range(4, 6):
        out, state = enc.step(x[:, t:t + 1], state)
        outs.append(out)
    outs.append(enc.step(x[:, 6:], state)[0])  # a chunk
    torch.testing.assert_close(torch.cat(outs, 1), enc(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_path_equals_the_materialised_bias(causal):
    """SoftmaxAttention's long-input path (blocks of query rows, the encoding called per
    block with the keys) = the materialised bias: outputs and gradients to W_R, u, v."""
    results = []
    for blockwise in (False, True):
        torch.manual_seed(0)
        pe = TransformerXLRelativePosition(d_model=16, n_heads=2, head_dim=8, init_std=0.5)
        attn = SoftmaxAttention(16, 2, causal=causal, positional=pe, blockwise=blockwise,
                                block_size=3).double()
        x = torch.randn(2, 8, 16, dtype=F64)
        mem = torch.randn(2, 3, 16, dtype=F64)
        out = attn(x, context=torch.cat([mem, x], 1), positions=torch.arange(3, 11),
                   context_positions=torch.arange(11))
        out.square().sum().backward()
        results.append((out, pe.r_proj.weight.grad, pe.u.grad, pe.v.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["arange", "batched", "clamp", "gaps"])
def test_bias_rows_equal_forward_rows(case):
    """``bias_rows`` (the blockwise kernels' entry: the W_R R table once per call) gives the
    rows of ``forward``'s bias; positions with gaps fall back to ``forward`` per block."""
    pe = _encoding(clamp_len=2 if case == "clamp" else None)
    n, m = 7, 10
    q, k = _qk(2, 2, n, m, 4)
    qpos, kpos = torch.arange(n) + m - n, torch.arange(m)
    if case == "batched":
        qpos, kpos = torch.stack([qpos, qpos + 4]), torch.stack([kpos, kpos + 1])
    if case == "gaps":
        qpos, kpos = qpos * 2, kpos * 3
    full = pe(q, qpos, kpos, k=k)
    rows = pe.bias_rows(q, qpos, kpos, k=k)
    for i0, i1 in [(0, 3), (3, 7), (6, 7)]:
        torch.testing.assert_close(rows(i0, i1), full[:, :, i0:i1], rtol=0, atol=1e-14)


def test_blockwise_builds_the_distance_table_once_per_call(monkeypatch):
    import transformer_zoo.functional.transformer_xl as txl

    calls = []
    real = txl.transformer_xl_sinusoid
    monkeypatch.setattr(txl, "transformer_xl_sinusoid",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pe = TransformerXLRelativePosition(d_model=16, n_heads=2, head_dim=8)
    attn = SoftmaxAttention(16, 2, causal=True, positional=pe, blockwise=True, block_size=2)
    with torch.no_grad():
        attn(torch.randn(1, 8, 16))
    assert len(calls) == 1  # 4 blocks, one table
