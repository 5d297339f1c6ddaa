"""DeBERTa disentangled attention (``DebertaRelativeBias``): equal to Hugging Face's
``DisentangledSelfAttention`` (deberta_v2) with the same weights for every option combination
HF supports, a whole ``DebertaV2Model`` with our attention swapped in, the log buckets against
HF (bit-equal) and a slow reference from the definition, a slow loop over (i, j) of eqs. 2-4
(also where HF is not defined: p2c with n != m, offset positions), and the properties:
translation invariance, row blocks, causal masks, gradients, padded rows, compat refusals."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from transformer_zoo import (
    DebertaRelativeBias,
    DebertaRelativeEmbeddings,
    Encoder,
    EncoderConfig,
    NystromAttention,
    PerformerAttention,
    SoftmaxAttention,
)
from transformer_zoo.functional.deberta import (
    deberta_log_bucket,
    deberta_position_index,
    deberta_relative_positions,
)

hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
DebertaV2Config = pytest.importorskip("transformers").DebertaV2Config

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8
MAX_POS = 24  # HF's max_position_embeddings: what max_relative_positions=-1 stands for
TERMS = [(), ("c2p",), ("p2c",), ("c2p", "p2c")]


def hf_config(position_buckets, max_relative_positions, share_att_key, pos_att_type, **extra):
    return DebertaV2Config(
        hidden_size=D_MODEL, num_attention_heads=HEADS, intermediate_size=2 * D_MODEL,
        relative_attention=True, position_buckets=position_buckets,
        max_relative_positions=max_relative_positions, share_att_key=share_att_key,
        pos_att_type=list(pos_att_type), max_position_embeddings=MAX_POS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra,
    )


def copy_from_hf(ours: SoftmaxAttention, theirs: nn.Module, identity_out: bool = True) -> None:
    """HF's query/key/value (and position) projections into ours; out_proj = identity
    (HF's self-attention has none: its output dense sits in DebertaV2SelfOutput)."""
    pe = ours.positional
    with torch.no_grad():
        ours.q_proj.load_state_dict(theirs.query_proj.state_dict())
        ours.kv_proj.weight.copy_(torch.cat([theirs.key_proj.weight, theirs.value_proj.weight]))
        ours.kv_proj.bias.copy_(torch.cat([theirs.key_proj.bias, theirs.value_proj.bias]))
        if identity_out:
            ours.out_proj.weight.copy_(torch.eye(D_MODEL))
            ours.out_proj.bias.zero_()
        if not pe.share_att_key:
            if "c2p" in pe.pos_att_type:
                pe.pos_key_proj.load_state_dict(theirs.pos_key_proj.state_dict())
            if "p2c" in pe.pos_att_type:
                pe.pos_query_proj.load_state_dict(theirs.pos_query_proj.state_dict())


def pair(position_buckets, max_relative_positions, share_att_key, pos_att_type, seed=0):
    torch.manual_seed(seed)
    theirs = hf.DisentangledSelfAttention(
        hf_config(position_buckets, max_relative_positions, share_att_key, pos_att_type)
    ).eval()
    table = DebertaRelativeEmbeddings(
        d_model=D_MODEL, position_buckets=position_buckets,
        max_relative_positions=MAX_POS if max_relative_positions < 1 else max_relative_positions,
    )
    assert table.att_span == theirs.pos_ebd_size
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, embeddings=table,
                               share_att_key=share_att_key, pos_att_type=pos_att_type)
    ours = SoftmaxAttention(D_MODEL, HEADS, positional=bias).eval()
    copy_from_hf(ours, theirs)
    return ours, theirs, table


# (position_buckets, max_relative_positions): v1 clip over MAX_POS and over 6; log buckets
# whose range is MAX_POS and 10. Sequences of 30 run past every span (clamped rows used).
BUCKETS = [(-1, -1), (-1, 6), (8, -1), (8, 10)]


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("pos_att_type", TERMS, ids=lambda t: "+".join(t) or "none")
@pytest.mark.parametrize("share_att_key", [True, False], ids=["shared", "own"])
@pytest.mark.parametrize("buckets", BUCKETS, ids=lambda b: f"pb{b[0]}-mrp{b[1]}")
def test_equals_hf_disentangled_self_attention(buckets, share_att_key, pos_att_type, padding):
    ours, theirs, table = pair(*buckets, share_att_key, pos_att_type)
    n = 30
    x = torch.randn(3, n, D_MODEL)
    mask = torch.ones(3, n, dtype=torch.bool)
    if padding:
        mask[1, 19:] = False
        mask[2, :4] = False  # left padding too
    with torch.no_grad():
        want = theirs(x, mask[:, None, None, :], rel_embeddings=table.weight)[0]
        got = ours(x, mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos_att_type", [(), ("c2p",)], ids=["none", "c2p"])
@pytest.mark.parametrize("share_att_key", [True, False], ids=["shared", "own"])
@pytest.mark.parametrize("buckets", BUCKETS, ids=lambda b: f"pb{b[0]}-mrp{b[1]}")
def test_equals_hf_with_other_query_length(buckets, share_att_key, pos_att_type):
    """n != m (HF's ``query_states``): HF is defined for it without the p2c term only (its
    p2c adds an (m, m) term to the (n, m) scores); the p2c case is covered by the loop."""
    ours, theirs, table = pair(*buckets, share_att_key, pos_att_type, seed=1)
    xq, xk = torch.randn(2, 11, D_MODEL), torch.randn(2, 27, D_MODEL)
    mask = torch.ones(2, 27, dtype=torch.bool)
    mask[0, 20:] = False
    with torch.no_grad():
        want = theirs(xk, mask[:, None, None, :], query_states=xq,
                      rel_embeddings=table.weight)[0]
        got = ours(xq, context=xk, mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


class OursInHF(nn.Module):
    """Our attention in the place of HF's ``DisentangledSelfAttention`` (same call)."""

    def __init__(self, attn: SoftmaxAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, hidden_states, attention_mask, output_attentions=False,
                query_states=None, relative_pos=None, rel_embeddings=None):
        keys = attention_mask[:, 0].amax(-2).bool()  # HF's (b, 1, n, n) = query ∧ key real
        return self.attn(hidden_states, mask=keys), None


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_whole_deberta_v2_model_with_our_attention(version):
    """A tiny random DebertaV2Model; every layer's self-attention replaced by ours (one table
    shared by the layers, LayerNorm on it in v3); real tokens equal, fp32."""
    if version == "v1":
        options = dict(position_buckets=-1, max_relative_positions=6, share_att_key=False,
                       pos_att_type=("c2p", "p2c"))
        extra = {}
    else:
        options = dict(position_buckets=8, max_relative_positions=-1, share_att_key=True,
                       pos_att_type=("p2c", "c2p"))
        extra = dict(norm_rel_ebd="layer_norm", position_biased_input=False)
    torch.manual_seed(0)
    config = hf_config(**options, num_hidden_layers=2, vocab_size=50, **extra)
    model = hf.DebertaV2Model(config).eval()
    ids = torch.randint(1, 50, (2, 20))  # past the v1 span (6) and the 8 buckets
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 17:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    enc = model.encoder
    table = DebertaRelativeEmbeddings(
        d_model=D_MODEL, position_buckets=enc.position_buckets,
        max_relative_positions=enc.max_relative_positions,
        layer_norm="layer_norm" in enc.norm_rel_ebd, layer_norm_eps=config.layer_norm_eps,
    )
    with torch.no_grad():
        table.weight.copy_(enc.rel_embeddings.weight)
        if table.norm is not None:
            table.norm.load_state_dict(enc.LayerNorm.state_dict())
    for layer in enc.layer:
        theirs = layer.attention.self
        bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, embeddings=table,
                                   share_att_key=theirs.share_att_key,
                                   pos_att_type=tuple(theirs.pos_att_type))
        ours = SoftmaxAttention(D_MODEL, HEADS, positional=bias).eval()
        copy_from_hf(ours, theirs)
        layer.attention.self = OursInHF(ours)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


# -- the buckets ---------------------------------------------------------------------------
def slow_log_bucket(r: int, buckets: int, max_position: int) -> int:
    """The v2/v3 log bucket of one int, in fp64 (the authors' NumPy form)."""
    mid = buckets // 2
    if abs(r) <= mid:
        return r
    log_pos = math.ceil(math.log(abs(r) / mid) / math.log((max_position - 1) / mid)
                        * (mid - 1)) + mid
    return int(math.copysign(log_pos, r))


BUCKET_CONFIGS = [(256, 512), (256, 1024), (128, 512), (64, 256), (32, 128), (8, 10), (2, 5),
                  (3, 7)]


@pytest.mark.parametrize("buckets,max_position", BUCKET_CONFIGS)
def test_log_bucket_bit_equal_to_hf(buckets, max_position):
    r = torch.arange(-20000, 20001)
    want = hf.make_log_bucket_position(r, buckets, max_position).long()
    got = deberta_log_bucket(r, position_buckets=buckets, max_relative_positions=max_position)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


@pytest.mark.parametrize("buckets,max_position", BUCKET_CONFIGS)
def test_log_bucket_against_slow_reference(buckets, max_position):
    """Equal rows of the table (after the clamp to [0, 2k − 1]) for every distance; exact
    up to mid; odd; monotone in |r|; |r| = max_position − 1 on bucket 2·mid − 1."""
    r = torch.arange(-3000, 3001)
    got = deberta_log_bucket(r, position_buckets=buckets, max_relative_positions=max_position)
    want = torch.tensor([slow_log_bucket(int(v), buckets, max_position) for v in r])
    span = buckets
    torch.testing.assert_close(deberta_position_index(got, span),
                               deberta_position_index(want, span), rtol=0, atol=0)
    mid = buckets // 2
    exact = r.abs() <= mid
    assert torch.equal(got[exact], r[exact])
    assert torch.equal(got.flip(0), -got)
    pos = got[r >= 0]
    assert bool((pos[1:] >= pos[:-1]).all())
    assert slow_log_bucket(max_position - 1, buckets, max_position) == 2 * mid - 1
    edge = torch.tensor([max_position - 1])
    assert deberta_log_bucket(edge, position_buckets=buckets,
                              max_relative_positions=max_position).item() == 2 * mid - 1


def test_relative_positions_equal_hf_build_relative_position():
    q, k = torch.zeros(1, 13, 1), torch.zeros(1, 21, 1)
    for bucket, max_position in [(-1, -1), (8, 10), (256, 512)]:
        want = hf.build_relative_position(q, k, bucket_size=bucket, max_position=max_position)[0]
        got = deberta_relative_positions(torch.arange(13), torch.arange(21),
                                         position_buckets=bucket,
                                         max_relative_positions=max(max_position, 1))
        assert torch.equal(got, want)


# -- a slow loop over (i, j) of eqs. 2-4 --------------------------------------------------------
def slow_bias(pe: DebertaRelativeBias, q, k, q_pos, k_pos, content):
    """Ã_ij − Q^c_i·K^c_j for one batch row, fp64, one (h, i, j) at a time from the definition:
    c2p = Q^c_i·K^r[δ], p2c = K^c_j·Q^r[δ], δ = clamp(bucket(pos_i − pos_j) + k, 0, 2k − 1)."""
    table = pe.embeddings.weight.double()
    if pe.embeddings.norm is not None:
        table = pe.embeddings.norm.double()(table)
    q_proj, kv_proj = content
    inner = HEADS * HEAD_DIM
    if pe.share_att_key:
        wk, bk = kv_proj.weight[:inner].double(), kv_proj.bias[:inner].double()
        wq, bq = q_proj.weight.double(), q_proj.bias.double()
    else:
        wk = bk = wq = bq = None
        if "c2p" in pe.pos_att_type:
            wk, bk = pe.pos_key_proj.weight.double(), pe.pos_key_proj.bias.double()
        if "p2c" in pe.pos_att_type:
            wq, bq = pe.pos_query_proj.weight.double(), pe.pos_query_proj.bias.double()
    span, buckets = pe.embeddings.att_span, pe.embeddings.position_buckets
    mrp = pe.embeddings.max_relative_positions
    scale = 1 / math.sqrt(HEAD_DIM * (1 + len(pe.pos_att_type)))
    n, m = q.shape[1], k.shape[1]
    out = torch.zeros(HEADS, n, m, dtype=torch.float64)
    for h, i, j in itertools.product(range(HEADS), range(n), range(m)):
        r = int(q_pos[i] - k_pos[j])
        r = slow_log_bucket(r, buckets, mrp) if buckets > 0 else r
        row = min(max(r + span, 0), 2 * span - 1)
        cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        total = 0.0
        if "c2p" in pe.pos_att_type:
            total += q[h, i] @ (table[row] @ wk[cols].T + bk[cols])
        if "p2c" in pe.pos_att_type:
            total += k[h, j] @ (table[row] @ wq[cols].T + bq[cols])
        out[h, i, j] = total * scale
    return out


@pytest.mark.parametrize("buckets", [(-1, 4), (6, 9)], ids=["v1", "log"])
@pytest.mark.parametrize("pos_att_type", TERMS[1:], ids=lambda t: "+".join(t))
@pytest.mark.parametrize("share_att_key", [True, False], ids=["shared", "own"])
def test_bias_equals_slow_loop(buckets, pos_att_type, share_att_key):
    """Any n, m (p2c with n != m, where HF is not defined), offset and batched positions."""
    torch.manual_seed(3)
    pb, mrp = buckets
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, position_buckets=pb,
                               max_relative_positions=mrp, layer_norm=True,
                               share_att_key=share_att_key, pos_att_type=pos_att_type)
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias).double()
    with torch.no_grad():
        bias.embeddings.norm.weight.uniform_(0.5, 1.5)
    n, m = 5, 13
    q = torch.randn(2, HEADS, n, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(2, HEADS, m, HEAD_DIM, dtype=torch.float64)
    q_pos = torch.stack([torch.arange(n) + 7, torch.arange(n) * 3])
    k_pos = torch.stack([torch.arange(m) + 100, torch.arange(m)])
    got = bias(q, q_pos, k_pos, k=k)
    for row in range(2):
        want = slow_bias(bias, q[row], k[row], q_pos[row], k_pos[row],
                         (attn.q_proj, attn.kv_proj))
        torch.testing.assert_close(got[row], want, rtol=1e-10, atol=1e-10)


# -- properties ----------------------------------------------------------------------------
def small_bias(**options) -> tuple[SoftmaxAttention, DebertaRelativeBias]:
    options = {"position_buckets": 6, "max_relative_positions": 9, **options}
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, **options)
    return SoftmaxAttention(D_MODEL, HEADS, positional=bias), bias


@settings(max_examples=15, deadline=None)
@given(shift=st.integers(-10**6, 10**6), share=st.booleans())
def test_translation_invariance(shift, share):
    torch.manual_seed(0)
    _, bias = small_bias(share_att_key=share)
    q, k = torch.randn(2, HEADS, 6, HEAD_DIM), torch.randn(2, HEADS, 9, HEAD_DIM)
    qp, kp = torch.arange(6) + 2, torch.arange(9)
    base = bias(q, qp, kp, k=k)
    moved = bias(q, qp + shift, kp + shift, k=k)
    assert torch.equal(base, moved)


@pytest.mark.parametrize("batched", [False, True])
def test_row_blocks_give_exactly_those_rows(batched):
    torch.manual_seed(1)
    _, bias = small_bias(share_att_key=True)
    n, m = 17, 23
    q, k = torch.randn(2, HEADS, n, HEAD_DIM), torch.randn(2, HEADS, m, HEAD_DIM)
    qp, kp = torch.arange(n) + 4, torch.arange(m)
    if batched:
        qp, kp = torch.stack([qp, qp * 2]), torch.stack([kp, kp + 1])
    full = bias(q, qp, kp, k=k)
    index = bias.embeddings.index(qp, kp)
    for i0, i1 in [(0, 1), (0, 5), (5, 12), (12, 17), (16, 17)]:
        block = bias(q[:, :, i0:i1], qp[..., i0:i1], kp, k=k)
        assert torch.equal(bias.embeddings.index(qp[..., i0:i1], kp), index[..., i0:i1, :])
        # equal to rounding: a one-row q @ K^rᵀ may take BLAS's matrix-vector path
        torch.testing.assert_close(block, full[:, :, i0:i1], rtol=0, atol=1e-6)


def test_causal_rows_ignore_later_tokens():
    torch.manual_seed(2)
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, position_buckets=6,
                               max_relative_positions=9)
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias, causal=True).eval()
    x = torch.randn(2, 12, D_MODEL)
    y = x.clone()
    y[:, 7:] = torch.randn(2, 5, D_MODEL)
    a, b = attn(x), attn(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("share_att_key", [True, False])
def test_gradients_reach_the_table_and_projections(share_att_key):
    torch.manual_seed(4)
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, position_buckets=6,
                               max_relative_positions=9, layer_norm=True,
                               share_att_key=share_att_key)
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias)
    attn(torch.randn(2, 14, D_MODEL)).square().sum().backward()
    params = [bias.embeddings.weight, bias.embeddings.norm.weight, bias.embeddings.norm.bias]
    if not share_att_key:
        params += [bias.pos_key_proj.weight, bias.pos_key_proj.bias,
                   bias.pos_query_proj.weight, bias.pos_query_proj.bias]
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if share_att_key:  # the rows the sequence uses get gradient through q_proj / kv_proj
        used = bias.embeddings.index(torch.arange(14), torch.arange(14)).unique()
        assert bias.embeddings.weight.grad[used].abs().sum(-1).gt(0).all()


def test_gradcheck_fp64():
    torch.manual_seed(5)
    bias = DebertaRelativeBias(d_model=8, n_heads=2, position_buckets=4,
                               max_relative_positions=6, share_att_key=True).double()
    attn = SoftmaxAttention(8, 2, positional=bias).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    table = bias.embeddings.weight
    assert torch.autograd.gradcheck(lambda x, t: attn(x), (x, table))


def test_padded_rows_give_zero_not_nan():
    torch.manual_seed(6)
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, share_att_key=True)
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias, bias=False)
    x = torch.randn(2, 6, D_MODEL, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False  # a sample with no real key: every row dead
    out = attn(x, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(bias.embeddings.weight.grad).all()


def test_scale_is_one_over_sqrt_d_times_terms():
    for terms, factor in zip(TERMS, [1, 2, 2, 3], strict=True):
        bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, pos_att_type=terms)
        assert bias.logit_scale(HEAD_DIM) == pytest.approx(1 / math.sqrt(factor * HEAD_DIM))


def test_no_terms_is_plain_softmax_attention():
    torch.manual_seed(7)
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, pos_att_type=())
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias)
    plain = SoftmaxAttention(D_MODEL, HEADS)
    plain.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(2, 7, D_MODEL)
    torch.testing.assert_close(attn(x), plain(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", [PerformerAttention, NystromAttention])
def test_kernels_without_a_logit_bias_refuse_it(attention):
    with pytest.raises(ValueError, match=f"{attention.__name__} cannot use DebertaRelativeBias"):
        attention(D_MODEL, HEADS, positional=DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS))


# -- sharing and construction ---------------------------------------------------------------
def test_encoder_shares_one_table_each_layer_its_own_projections():
    table = DebertaRelativeEmbeddings(d_model=D_MODEL, position_buckets=8,
                                      max_relative_positions=16, layer_norm=True)
    config = EncoderConfig(
        d_model=D_MODEL, n_heads=HEADS, n_layers=3, dropout=0.0,
        positional=lambda: DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS,
                                               embeddings=table, share_att_key=True),
    )
    enc = Encoder(config)
    tables = {id(m) for m in enc.modules() if isinstance(m, DebertaRelativeEmbeddings)}
    assert tables == {id(table)}
    biases = [m for m in enc.modules() if isinstance(m, DebertaRelativeBias)]
    assert len(biases) == 3 and len({id(b._content[0]) for b in biases}) == 3
    x = torch.randn(2, 9, D_MODEL)
    out = enc(x)
    out.sum().backward()
    assert table.weight.grad is not None
    again = Encoder(config)
    again.load_state_dict(enc.state_dict())
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_share_att_key_refuses_a_second_attention():
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, share_att_key=True)
    SoftmaxAttention(D_MODEL, HEADS, positional=bias)
    with pytest.raises(ValueError, match="its own instance"):
        SoftmaxAttention(D_MODEL, HEADS, positional=bias)
    with pytest.raises(ValueError, match="its own instance"):
        Encoder(EncoderConfig(d_model=D_MODEL, n_heads=HEADS, n_layers=2,
                              positional=DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS,
                                                             share_att_key=True)))


def test_deepcopy_keeps_the_shared_projections_with_the_copy():
    import copy

    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, share_att_key=True)
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias)
    twin = copy.deepcopy(attn)
    assert twin.positional._content[0] is twin.q_proj
    assert twin.positional._content[1] is twin.kv_proj


def test_compiles_without_graph_breaks():
    attn, _ = small_bias(share_att_key=True)
    x = torch.randn(2, 7, D_MODEL)
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), attn(x))


@pytest.mark.parametrize("options,error,match", [
    (dict(pos_att_type="c2p"), TypeError, "sequence"),
    (dict(pos_att_type=("c2p", "p2x")), ValueError, "p2x"),
    (dict(pos_att_type=("c2p", "c2p")), ValueError, "distinct"),
    (dict(position_buckets=0), ValueError, "position_buckets"),
    (dict(position_buckets=256, max_relative_positions=100), ValueError, "log buckets need"),
    (dict(max_relative_positions=-1), ValueError, "max_relative_positions"),
    (dict(d_model=30), ValueError, "divisible"),
])
def test_bad_options_are_named(options, error, match):
    kwargs = {"d_model": D_MODEL, "n_heads": HEADS, **options}
    with pytest.raises(error, match=match):
        DebertaRelativeBias(**kwargs)


def test_mismatches_are_named():
    table = DebertaRelativeEmbeddings(d_model=D_MODEL)
    with pytest.raises(ValueError, match="come from it"):
        DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, embeddings=table, position_buckets=8)
    with pytest.raises(ValueError, match="width"):
        DebertaRelativeBias(d_model=16, n_heads=HEADS, embeddings=table)
    with pytest.raises(ValueError, match="n_heads"):
        SoftmaxAttention(D_MODEL, 2, positional=DebertaRelativeBias(d_model=D_MODEL,
                                                                    n_heads=HEADS))
    with pytest.raises(ValueError, match="kv_dim"):
        SoftmaxAttention(D_MODEL, HEADS, kv_dim=16, positional=DebertaRelativeBias(
            d_model=D_MODEL, n_heads=HEADS, share_att_key=True))
    with pytest.raises(ValueError, match="build the attention"):
        DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, share_att_key=True)(
            torch.randn(1, HEADS, 3, HEAD_DIM), torch.arange(3), torch.arange(3),
            k=torch.randn(1, HEADS, 3, HEAD_DIM))


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_path_equals_materialised(causal):
    """SoftmaxAttention's exact blockwise kernel (the bias one block of query rows at a time,
    recomputed in the backward) equals the materialised bias: outputs and the gradients of
    the input, the table, its LayerNorm and the projections (fp64)."""
    torch.manual_seed(8)
    table = DebertaRelativeEmbeddings(d_model=D_MODEL, position_buckets=6,
                                      max_relative_positions=9, layer_norm=True).double()
    grads = []
    for blockwise in (False, True):
        torch.manual_seed(9)  # the same weights in both
        bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, embeddings=table,
                                   share_att_key=not causal).double()
        attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias, causal=causal,
                                blockwise=blockwise, block_size=4).double()
        x = torch.randn(2, 15, D_MODEL, dtype=torch.float64, requires_grad=True)
        mask = torch.ones(2, 15, dtype=torch.bool)
        mask[1, 11:] = False
        table.zero_grad()
        out = attn(x, mask=mask)
        out.square().sum().backward()
        params = [x, table.weight, table.norm.weight, attn.q_proj.weight, attn.kv_proj.weight]
        if not bias.share_att_key:
            params += [bias.pos_key_proj.weight, bias.pos_query_proj.weight]
        grads.append([out.detach()] + [p.grad.clone() for p in params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("buckets", [(-1, 5), (256, 512), (8, 10), (2, 5), (3, 7), (5, 100)])
def test_lookup_table_gives_every_row(buckets):
    """``index_table``'s rows over the clamped distance equal the rows of every distance,
    including ±10¹² (past the saturation distance)."""
    pb, mrp = buckets
    table = DebertaRelativeEmbeddings(d_model=4, position_buckets=pb, max_relative_positions=mrp)
    rows, limit = table.index_table()
    delta = torch.cat([torch.arange(-3 * limit - 20, 3 * limit + 21),
                       torch.tensor([-10**12, -10**6, 10**6, 10**12])])
    want = table.index(torch.zeros(1, dtype=torch.int64), -delta)[0]
    assert torch.equal(rows[delta.clamp(-limit, limit) + limit], want)


@pytest.mark.parametrize("pos_att_type", TERMS, ids=lambda t: "+".join(t) or "none")
@pytest.mark.parametrize("share_att_key", [True, False], ids=["shared", "own"])
def test_score_mod_equals_forward(share_att_key, pos_att_type):
    """The score_mod, evaluated at every (b, h, i, j), is score + the forward's bias
    (batched positions with offsets, n != m)."""
    torch.manual_seed(10)
    _, bias = small_bias(share_att_key=share_att_key, pos_att_type=pos_att_type)
    n, m = 6, 11
    q, k = torch.randn(2, HEADS, n, HEAD_DIM), torch.randn(2, HEADS, m, HEAD_DIM)
    qp = torch.stack([torch.arange(n) + 5, torch.arange(n) * 4])
    kp = torch.stack([torch.arange(m), torch.arange(m) + 30])
    mod = bias.score_mod(q, k, qp, kp)
    b, h, i, j = torch.meshgrid(torch.arange(2), torch.arange(HEADS), torch.arange(n),
                                torch.arange(m), indexing="ij")
    score = torch.randn(2, HEADS, n, m)
    want = score + bias(q, qp, kp, k=k)
    torch.testing.assert_close(mod(score, b, h, i, j), want, rtol=0, atol=1e-6)


def test_flex_attention_with_score_mod_equals_materialised():
    """FlexAttention (its CPU forward) with the score_mod = the materialised bias."""
    from transformer_zoo.functional.flex import flex_attention_available, flex_softmax_attention
    from transformer_zoo.functional.softmax import softmax_attention

    if not flex_attention_available():
        pytest.skip("no FlexAttention in this torch")
    torch.manual_seed(11)
    _, bias = small_bias(share_att_key=True)
    q, k, v = (torch.randn(1, HEADS, 16, HEAD_DIM) for _ in range(3))
    pos = torch.arange(16) + 3
    scale = bias.logit_scale(HEAD_DIM)
    with torch.no_grad():
        want = softmax_attention(q, k, v, bias=bias(q, pos, pos, k=k), scale=scale, causal=True)
        got = flex_softmax_attention(q, k, v, score_mod=bias.score_mod(q, k, pos, pos),
                                     scale=scale, causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_kernel_names_bad_tables():
    from transformer_zoo.functional.deberta import disentangled_bias

    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    index = torch.zeros(3, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="pos_key: expected"):
        disentangled_bias(q, k, index, pos_key=torch.randn(3, 6, 4), pos_query=None, scale=1.0)
    with pytest.raises(ValueError, match="the same"):
        disentangled_bias(q, k, index, pos_key=torch.randn(2, 6, 4),
                          pos_query=torch.randn(2, 8, 4), scale=1.0)
    with pytest.raises(ValueError, match="needs the keys"):
        disentangled_bias(q, None, index, pos_key=None, pos_query=torch.randn(2, 6, 4),
                          scale=1.0)


def test_export_with_shared_projections():
    """torch.export of an attention whose bias reuses its projections: equal outputs, and the
    projections appear once in the exported state (under the attention)."""
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, position_buckets=8,
                               max_relative_positions=16, share_att_key=True)
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias).eval()
    x = torch.randn(2, 7, D_MODEL)
    exported = torch.export.export(attn, (x,))
    torch.testing.assert_close(exported.module()(x), attn(x), rtol=0, atol=1e-6)
    assert sorted(exported.state_dict) == sorted(attn.state_dict())
    assert not any(name.startswith("positional.") and "proj" in name
                   for name in attn.state_dict())


# -- bias_rows: the blockwise kernel's per-call tables -----------------------------------------
ROW_BLOCKS = [(0, 1), (0, 4), (3, 9), (9, 13), (12, 13), (0, 13)]


@pytest.mark.parametrize("positions", ["offset", "batched", "mixed"])
@pytest.mark.parametrize("pos_att_type", TERMS, ids=lambda t: "+".join(t) or "none")
@pytest.mark.parametrize("share_att_key", [True, False], ids=["shared", "own"])
@pytest.mark.parametrize("buckets", [(-1, 4), (6, 9), (8, 10**8), (256, 512)],
                         ids=["v1", "log", "log-no-lookup", "v3"])
def test_bias_rows_equal_forward_rows(buckets, share_att_key, pos_att_type, positions):
    """``bias_rows(q, …)(i0, i1)`` = rows i0:i1 of ``forward`` (fp64, 1e-12): v1 clipping,
    log buckets with and without a lookup table (2^22 < saturation distance), DeBERTa-v3's
    (256, 512), every term set, both projection modes, n != m, offset (n,), per-sample (b, n)
    and mixed (n,)/(b, m) positions reaching past the span (clamped rows)."""
    torch.manual_seed(12)
    pb, mrp = buckets
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, position_buckets=pb,
                               max_relative_positions=mrp, layer_norm=True,
                               share_att_key=share_att_key, pos_att_type=pos_att_type)
    SoftmaxAttention(D_MODEL, HEADS, positional=bias).double()
    n, m = 13, 90  # n·m >= 2L + 1 for v3 too: the lookup-table path (asserted below)
    q = torch.randn(2, HEADS, n, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(2, HEADS, m, HEAD_DIM, dtype=torch.float64)
    qp, kp = torch.arange(n) * 40 + 3, torch.arange(m) * 25
    lookup = bias.embeddings.index_table()
    assert (lookup is None) == (pb == 8) and (lookup is None or 2 * lookup[1] + 1 <= n * m)
    if positions == "batched":
        qp, kp = torch.stack([qp, torch.arange(n) + 1000]), torch.stack([kp, torch.arange(m)])
    elif positions == "mixed":
        kp = torch.stack([kp, torch.arange(m) * 7 - 50])
    full = bias(q, qp, kp, k=k)
    rows = bias.bias_rows(q, qp, kp, k=k)
    for i0, i1 in ROW_BLOCKS:
        torch.testing.assert_close(rows(i0, i1), full[:, :, i0:i1], rtol=0, atol=1e-12)


def test_bias_rows_draw_one_dropout_mask_per_call():
    """With dropout on P (training), every block uses the one dropped table of the call, the
    table ``forward`` draws from the same RNG state."""
    torch.manual_seed(13)
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, position_buckets=6,
                               max_relative_positions=9, dropout=0.5).train()
    q, k = torch.randn(1, HEADS, 13, HEAD_DIM), torch.randn(1, HEADS, 17, HEAD_DIM)
    qp, kp = torch.arange(13), torch.arange(17)
    torch.manual_seed(14)
    full = bias(q, qp, kp, k=k)
    torch.manual_seed(14)
    rows = bias.bias_rows(q, qp, kp, k=k)
    got = torch.cat([rows(i0, min(i0 + 3, 13)) for i0 in range(0, 13, 3)], dim=2)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(position_buckets=-1, max_relative_positions=5, share_att_key=False, dropout=0.3),
    dict(position_buckets=256, max_relative_positions=512, share_att_key=True, dropout=0.3),
    dict(position_buckets=6, max_relative_positions=9, share_att_key=False,
         pos_att_type=("p2c",)),
    dict(position_buckets=6, max_relative_positions=9, share_att_key=True,
         pos_att_type=("c2p",)),
], ids=["v1-dropout", "v3-dropout", "p2c", "c2p"])
def test_blockwise_gradients_equal_materialised_with_every_option(options):
    """Blockwise (bias_rows, 5 blocks, recomputing backward) = materialised, fp64, in
    training with dropout on P: outputs and the gradients of x, q/k projections, the table
    and its LayerNorm, the position projections (the same dropped table in both)."""
    grads = []
    for blockwise in (False, True):
        torch.manual_seed(15)
        bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, layer_norm=True, **options)
        attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias, blockwise=blockwise,
                                block_size=3).double().train()
        x = torch.randn(2, 14, D_MODEL, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(16)  # the same dropout draw on P
        out = attn(x)
        out.square().sum().backward()
        params = [x, bias.embeddings.weight, bias.embeddings.norm.weight, attn.q_proj.weight,
                  attn.kv_proj.weight]
        params += [p for name, p in bias.named_parameters() if "pos_" in name]
        grads.append([out.detach()] + [p.grad.clone() for p in params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("share_att_key", [True, False], ids=["shared", "own"])
def test_blockwise_builds_the_position_tables_once_per_call(share_att_key):
    """One table P, one K^r and Q^r projection and one p2c table per attention call, forward
    and (recomputing) backward, whatever the number of blocks."""
    import transformer_zoo.functional.deberta as fd

    torch.manual_seed(17)
    bias = DebertaRelativeBias(d_model=D_MODEL, n_heads=HEADS, position_buckets=6,
                               max_relative_positions=9, share_att_key=share_att_key)
    attn = SoftmaxAttention(D_MODEL, HEADS, positional=bias, blockwise=True, block_size=2)
    calls = []
    projections = [attn.q_proj, attn.kv_proj] if share_att_key else [bias.pos_key_proj,
                                                                        bias.pos_query_proj]
    hooks = [bias.embeddings.register_forward_hook(lambda *a: calls.append("P"))]
    table_shapes = []

    def count(module, args, output):
        if args[0].shape[-2] == 2 * bias.embeddings.att_span:  # the table, not the tokens
            calls.append("proj")

    hooks += [p.register_forward_hook(count) for p in projections]
    real = torch.matmul

    def matmul(a, b):
        out = real(a, b)
        if out.shape[-2] == 2 * bias.embeddings.att_span:  # (b, h, 2k, m): the p2c table
            table_shapes.append(tuple(out.shape))
        return out

    fd.torch.matmul = matmul  # the module's torch is torch: restored below
    try:
        attn(torch.randn(1, 10, D_MODEL)).sum().backward()  # 5 blocks
    finally:
        fd.torch.matmul = real
        for hook in hooks:
            hook.remove()
    want_proj = 1 if share_att_key else 2  # share_att_key: q_proj(P) and F.linear for K^r
    assert calls.count("P") == 1 and calls.count("proj") == want_proj
    assert table_shapes == [(1, HEADS, 2 * bias.embeddings.att_span, 10)]
