"""transformer_zoo.interop.torch: exact softmax swaps, mask polarity, approximate swaps, errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import transformer_zoo
from transformer_zoo import (
    ALiBi,
    MultiHeadAttention,
    NystromAttention,
    PerformerAttention,
    Place,
    RotaryEmbedding,
    ShawRelativePosition,
    SoftmaxAttention,
)
from transformer_zoo.interop import MultiheadAttentionCompat, swap_attention
from transformer_zoo.interop._masks import settle_bias, split_additive

TOL = 1e-5
D, H, FF = 32, 4, 64

pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched src_key_padding_mask"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]


class ToyLinearAttention(MultiHeadAttention):
    """Test-local approximate kernel: φ(x) = elu(x) + 1 linear attention (Katharopoulos 2020).

    o_i = Σ_j φ(q_i)ᵀφ(k_j) v_j / Σ_j φ(q_i)ᵀφ(k_j), j over real keys (and j <= i if causal).
    """

    accepts = frozenset({Place.INPUT, Place.QK})

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, q_positions, k_positions,
               query_padding_mask=None):
        if attn_mask is not None:
            raise ValueError("ToyLinearAttention takes no attn_mask")
        q, k = F.elu(q) + 1, F.elu(k) + 1  # (b, h, n|m, d)
        if key_padding_mask is not None:
            k = k * key_padding_mask[:, None, :, None]
        if self.causal:
            kv = torch.einsum("bhmd,bhme->bhmde", k, v).cumsum(2)  # (b, h, m, d, e)
            num = torch.einsum("bhnd,bhnde->bhne", q, kv)
            den = torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(2))
        else:
            num = torch.einsum("bhnd,bhde->bhne", q, torch.einsum("bhmd,bhme->bhde", k, v))
            den = torch.einsum("bhnd,bhd->bhn", q, k.sum(2))
        return num / den.clamp_min(1e-6)[..., None]


class NonCausalToy(ToyLinearAttention):
    supports_causal = False


def exported_approximations() -> list[type[MultiHeadAttention]]:
    """Every MultiHeadAttention subclass transformer_zoo exports, except exact softmax."""
    found = [getattr(transformer_zoo, name) for name in transformer_zoo.__all__]
    found = [c for c in found if isinstance(c, type) and issubclass(c, MultiHeadAttention)]
    return [c for c in found if c not in (MultiHeadAttention, SoftmaxAttention)]


def encoder(batch_first: bool, layers: int = 2) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=batch_first)


def padding(b: int, n: int) -> Tensor:
    pad = torch.zeros(b, n, dtype=torch.bool)  # torch polarity: True = padding
    pad[1, n - 3:] = True
    pad[2, n - 1:] = True
    return pad


def ours_grads(model: nn.Module) -> dict[str, Tensor]:
    """Our parameter gradients under the original nn.MultiheadAttention names."""
    out = {}
    for name, p in model.named_parameters():
        if ".attention.q_proj." in name or ".attention.kv_proj." in name:
            continue
        out[name.replace(".attention.out_proj.", ".out_proj.")] = p.grad
    for name, mod in model.named_modules():
        if isinstance(mod, MultiheadAttentionCompat):
            inner = mod.attention
            out[f"{name}.in_proj_weight"] = torch.cat([inner.q_proj.weight.grad,
                                                      inner.kv_proj.weight.grad])
            out[f"{name}.in_proj_bias"] = torch.cat([inner.q_proj.bias.grad,
                                                    inner.kv_proj.bias.grad])
    return out


MASKS = ["none", "padding", "causal", "causal+padding"]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("masks", MASKS)
def test_softmax_swap_encoder_outputs_and_gradients(batch_first, train, masks):
    ref = encoder(batch_first)
    ours = copy.deepcopy(ref)
    report = swap_attention(ours, SoftmaxAttention)
    assert report.replaced == ["layers.0.self_attn", "layers.1.self_attn"]
    ref.train(train), ours.train(train)
    b, n = 3, 9
    x = torch.randn(b, n, D) if batch_first else torch.randn(n, b, D)
    kw = {}
    if "padding" in masks:
        kw["src_key_padding_mask"] = padding(b, n)
    if "causal" in masks:
        kw.update(mask=nn.Transformer.generate_square_subsequent_mask(n), is_causal=True)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_ours = ref(x_ref, **kw), ours(x_ours, **kw)
    torch.testing.assert_close(out_ours, out_ref, atol=TOL, rtol=0)
    weight = torch.randn_like(out_ref)
    (out_ref * weight).sum().backward()
    (out_ours * weight).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=TOL, rtol=0)
    grads = ours_grads(ours)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=TOL, rtol=0, msg=name)


def test_eval_no_grad_padding_runs_our_attention():
    """nn.TransformerEncoder's nested-tensor path would skip us; swap_attention turns it off."""
    ref = encoder(batch_first=True).eval()
    ours = copy.deepcopy(ref)
    calls = []

    class Spy(SoftmaxAttention):
        def attend(self, *args, **kwargs):
            calls.append(1)
            return super().attend(*args, **kwargs)

    report = swap_attention(ours, Spy)
    assert report.nested_tensor_disabled == ["<model>"] and not ours.use_nested_tensor
    x, pad = torch.randn(3, 9, D), padding(3, 9)
    with torch.no_grad():
        out_ref, out_ours = ref(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
    assert len(calls) == 2
    real = ~pad  # the nested path zeroes padded rows; compare real tokens
    torch.testing.assert_close(out_ours[real], out_ref[real], atol=TOL, rtol=0)


def test_full_transformer_with_cross_attention():
    ref = nn.Transformer(D, H, 2, 2, FF, dropout=0.0, batch_first=True)
    ours = copy.deepcopy(ref)
    report = swap_attention(ours, SoftmaxAttention)
    assert len(report.replaced) == 6 and "decoder.layers.0.multihead_attn" in report.replaced
    src, tgt = torch.randn(3, 9, D), torch.randn(3, 6, D)
    kw = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(6), tgt_is_causal=True,
              src_key_padding_mask=padding(3, 9), memory_key_padding_mask=padding(3, 9))
    torch.testing.assert_close(ours(src, tgt, **kw), ref(src, tgt, **kw), atol=TOL, rtol=0)


@given(
    batch_first=st.booleans(),
    float_masks=st.booleans(),
    per_head=st.booleans(),
    average=st.booleans(),
    cross=st.sampled_from(["no", "kdim == vdim", "kdim != vdim"]),
    unbatched=st.booleans(),
    inputs=st.sampled_from(["self", "shared_kv", "separate"]),
    need_weights=st.booleans(),
)
def test_direct_call_matches_multihead_attention(batch_first, float_masks, per_head, average,
                                                 cross, unbatched, inputs, need_weights):
    kdim = None if cross == "no" else 24
    vdim = 12 if cross == "kdim != vdim" else kdim
    ref = nn.MultiheadAttention(D, H, kdim=kdim, vdim=vdim, batch_first=batch_first)
    ours = MultiheadAttentionCompat.from_torch(ref, SoftmaxAttention)
    cross = cross != "no"
    b, n, m = 3, 5, 7 if cross else 5
    e_kv = kdim or D

    def seq(length, width):
        if unbatched:
            return torch.randn(length, width)
        return torch.randn(b, length, width) if batch_first else torch.randn(length, b, width)

    if inputs == "self" and not cross:
        q = k = v = seq(n, D)  # the three code paths: module forward, with context, attend
    else:
        q, k = seq(n, D), seq(m, e_kv)
        v = k if inputs != "separate" and vdim == kdim else seq(m, vdim or D)
    kpm = padding(b, m)
    am = torch.rand((b * H if per_head else 1), n, m) < 0.3
    am[..., 0] = False  # every query keeps key 0
    am = am if per_head else am[0]
    if unbatched:
        kpm, am = kpm[1], (am[:H] if per_head else am)
    if float_masks:
        kpm = torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))
        am = torch.zeros(am.shape).masked_fill(am, float("-inf"))
    kw = dict(key_padding_mask=kpm, attn_mask=am, average_attn_weights=average,
              need_weights=need_weights)
    out_ref, w_ref = ref(q, k, v, **kw)
    out_ours, w_ours = ours(q, k, v, **kw)
    torch.testing.assert_close(out_ours, out_ref, atol=TOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(w_ours, w_ref, atol=TOL, rtol=0)
    else:
        assert w_ours is None and w_ref is None


def test_general_float_mask_goes_in_as_bias():
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    ours = MultiheadAttentionCompat.from_torch(ref, SoftmaxAttention)
    x = torch.randn(2, 6, D)
    bias = torch.randn(6, 6)
    bias[0, 3] = float("-inf")
    kpm = torch.randn(2, 6)  # float key padding masks are added too
    out_ref, _ = ref(x, x, x, attn_mask=bias, key_padding_mask=kpm, need_weights=False)
    out_ours, w = ours(x, x, x, attn_mask=bias, key_padding_mask=kpm, need_weights=False)
    assert w is None
    torch.testing.assert_close(out_ours, out_ref, atol=TOL, rtol=0)
    assert ours.attention.call_bias is None  # the per-call bias is removed again


ENCODINGS = {
    "rotary": lambda: RotaryEmbedding(head_dim=D // H),
    "alibi": lambda: ALiBi(n_heads=H),
    "shaw": lambda: ShawRelativePosition(head_dim=D // H, max_distance=3, init_std=0.5),
}


def reference_with_encoding(ours: MultiheadAttentionCompat, q, k, v, mask: Tensor) -> Tensor:
    """Slow fp64 reference: softmax(q̃k̃ᵀ/√d + B_encoding + mask) V (+ Shaw's value term)."""
    inner, h = ours.attention, H
    w_k, w_v = inner.kv_proj.weight.chunk(2)
    b_k, b_v = inner.kv_proj.bias.chunk(2)
    split = lambda t: t.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731  (b, h, n, d)
    qh, kh = split(inner.q_proj(q)), split(F.linear(k, w_k, b_k))
    vh = split(F.linear(v, w_v, b_v))
    pq, pk = torch.arange(q.shape[1]), torch.arange(k.shape[1])
    pe = inner.positional
    bias = torch.zeros(())
    if isinstance(pe, RotaryEmbedding):
        qh, kh = pe(qh, kh, pq, pk)
    else:
        bias = pe(qh, pq, pk)
    weights = torch.softmax(qh @ kh.mT / (D // H) ** 0.5 + bias + mask, dim=-1)
    out = weights @ vh
    if getattr(pe, "has_value_term", False):
        out = out + pe.value_term(weights, pq, pk)
    return inner.out_proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("inputs", ["self", "separate"])
def test_float_mask_adds_to_the_wrapped_encoding(encoding, inputs):
    """A float attn_mask and the wrapped attention's own encoding both apply (they sum)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(D, H, batch_first=True).double()
    factory = functools.partial(SoftmaxAttention, positional=ENCODINGS[encoding]())
    ours = MultiheadAttentionCompat.from_torch(ref, factory)
    plain = MultiheadAttentionCompat.from_torch(ref, SoftmaxAttention)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    q, k, v = (x, x, x) if inputs == "self" else (x, x.clone(), x.clone())
    kw = dict(need_weights=False)
    alone = ours(q, k, v, **kw)[0]
    # a constant offset is a no-op for softmax: the encoding must survive it
    offset = ours(q, k, v, attn_mask=torch.full((6, 6), 1e-3, dtype=torch.float64), **kw)[0]
    torch.testing.assert_close(offset, alone, atol=1e-12, rtol=0)
    assert (offset - plain(q, k, v, **kw)[0]).abs().max() > 1e-3  # the encoding matters here
    mask = torch.randn(6, 6, dtype=torch.float64)
    mask[0, 2] = float("-inf")
    out = ours(q, k, v, attn_mask=mask, **kw)[0]
    torch.testing.assert_close(out, reference_with_encoding(ours, q, k, v, mask),
                               atol=1e-12, rtol=0)
    assert ours.attention.call_bias is None


def test_is_causal_without_mask_applies_causal():
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    ours = MultiheadAttentionCompat.from_torch(ref, SoftmaxAttention)
    x = torch.randn(2, 6, D)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    out_ref, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    out_ours, _ = ours(x, x, x, is_causal=True, need_weights=False)
    torch.testing.assert_close(out_ours, out_ref, atol=TOL, rtol=0)
    assert not ours.attention.causal


# -- approximate kernels ----------------------------------------------------------------------
APPROX = [*exported_approximations(), ToyLinearAttention]


@pytest.mark.parametrize("attention", APPROX, ids=lambda c: c.__name__)
def test_approximate_swap_trains(attention):
    model = encoder(batch_first=True)
    report = swap_attention(model, attention)
    assert len(report.replaced) == 2
    assert all(type(layer.self_attn.attention) is attention for layer in model.layers)
    x, pad = torch.randn(3, 16, D), padding(3, 16)
    kw: dict = {"src_key_padding_mask": pad}
    if attention.supports_causal:
        kw.update(mask=nn.Transformer.generate_square_subsequent_mask(16), is_causal=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    target = torch.randn(3, 16, D)
    for _ in range(3):
        opt.zero_grad()
        loss = ((model(x, **kw) - target)[~pad] ** 2).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    model.eval()
    with torch.no_grad():
        out = model(x, **kw)
        # padded keys are ignored: changing padded inputs leaves real outputs unchanged
        x2 = x.masked_fill(pad[..., None], 5.0)
        out2 = model(x2, **kw)
        if attention.supports_causal:  # and later tokens do not reach earlier outputs
            x3 = x.clone()
            x3[:, 10] += 1.0
            torch.testing.assert_close(model(x3, **kw)[:, :10], out[:, :10], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[~pad], out2[~pad], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", APPROX, ids=lambda c: c.__name__)
def test_approximate_swap_rejects_masks_it_cannot_honour(attention):
    model = encoder(batch_first=True)
    swap_attention(model, attention)
    x = torch.randn(2, 8, D)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn.*float additive mask"):
        model(x, mask=torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn.*non-causal attn_mask"):
        model(x, mask=torch.rand(8, 8) < 0.3)


def test_partial_factory_and_where_filter():
    model = nn.Transformer(D, H, 1, 1, FF, dropout=0.0, batch_first=True)
    factory = functools.partial(ToyLinearAttention, head_dim=D // H)
    report = swap_attention(model, factory, where=lambda path, mod: "self_attn" in path)
    assert report.replaced == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn"]
    assert isinstance(model.decoder.layers[0].multihead_attn, nn.MultiheadAttention)


def test_shared_attention_stays_shared():
    shared = nn.MultiheadAttention(D, H, batch_first=True)
    model = nn.ModuleDict({k: nn.ModuleDict({"attn": shared}) for k in ("a", "b")})
    report = swap_attention(model, SoftmaxAttention)
    assert report.replaced == ["a.attn", "b.attn"]
    assert model["a"]["attn"] is model["b"]["attn"]
    assert isinstance(model["a"]["attn"], MultiheadAttentionCompat)


def test_hooks_on_the_original_fire_after_the_swap():
    """torch's test_transformerencoderlayer_no_fastpath_with_hooks, after swap_attention: hooks
    registered on layer.self_attn fire on the replacement, with its call and output."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True).eval()
    reference = copy.deepcopy(layer)
    calls: list[str] = []
    outputs: list[Tensor] = []

    def pre(module, args):
        calls.append("pre")

    def pre_kwargs(module, args, kwargs):
        calls.append("pre_kwargs")
        assert kwargs["need_weights"] is False  # TransformerEncoderLayer's own call
        return (args[0] * 2, *args[1:]), kwargs  # a pre-hook may rewrite the inputs

    def post(module, args, output):
        calls.append("post")
        outputs.append(output[0])

    def post_kwargs(module, args, kwargs, output):
        calls.append("post_kwargs")

    def backward(module, grad_input, grad_output):
        calls.append("backward")

    attn = layer.self_attn
    handles = [attn.register_forward_pre_hook(pre),
               attn.register_forward_pre_hook(pre_kwargs, with_kwargs=True),
               attn.register_forward_hook(post),
               attn.register_forward_hook(post_kwargs, with_kwargs=True),
               attn.register_full_backward_hook(backward)]
    state_calls = []
    attn.register_state_dict_post_hook(lambda module, state, prefix, local: state_calls.append(1))
    swap_attention(layer, SoftmaxAttention)
    assert isinstance(layer.self_attn, MultiheadAttentionCompat) and not attn._forward_hooks

    x = torch.randn(2, 5, D, requires_grad=True)
    out = layer(x)
    assert calls == ["pre", "pre_kwargs", "post", "post_kwargs"]
    # the rewritten query reached our attention: the output is torch's for query 2x
    q = x.detach()
    expected, _ = reference.self_attn(2 * q, q, q, need_weights=False)
    torch.testing.assert_close(outputs[0], expected, atol=TOL, rtol=0)
    out.sum().backward()
    assert calls[-1] == "backward"
    layer.state_dict()
    assert state_calls == [1]

    for handle in handles:  # the original handles still remove the hooks
        handle.remove()
    calls.clear()
    layer(x)
    assert calls == []


def test_noncausal_kernel_with_causal_mask_names_the_module():
    model = encoder(batch_first=True)
    swap_attention(model, NonCausalToy)
    causal = nn.Transformer.generate_square_subsequent_mask(8)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn: NonCausalToy does not support"):
        model(torch.randn(2, 8, D), mask=causal, is_causal=True)


def test_bad_targets_raise_naming_the_path():
    model = nn.Module()
    model.block = nn.Module()
    model.block.attn = nn.MultiheadAttention(D, H, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"block\.attn: add_bias_kv"):
        swap_attention(model, SoftmaxAttention)
    ours = MultiheadAttentionCompat(SoftmaxAttention, D, H, batch_first=True, path="m.attn")
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"m\.attn: is_causal=True but attn_mask is not"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match=r"m\.attn: key_padding_mask: expected"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        MultiheadAttentionCompat(lambda *a, **k: nn.Identity(), D, H)


def test_named_kernels_are_the_hf_bridge_names_and_defaults():
    """swap_attention(model, name, **options) takes huggingface.use's names, options, defaults."""
    from transformer_zoo.interop.hf_kernels import KERNELS, NystromKernel, PerformerKernel

    assert sorted(KERNELS) == ["hybrid_window", "nystrom", "performer", "softmax"]
    ref = encoder(batch_first=True)
    exact = copy.deepcopy(ref)
    swap_attention(exact, "softmax")
    x = torch.randn(3, 9, D)
    torch.testing.assert_close(exact(x), ref(x), atol=TOL, rtol=0)

    model = copy.deepcopy(ref)
    swap_attention(model, "performer", nb_features=16, seed=0)
    first, second = (layer.self_attn.attention for layer in model.layers)
    assert type(first) is PerformerAttention and first.nb_features == 16
    assert (first.layer, second.layer) == (0, 1)  # one W per layer from (seed, layer)
    assert not torch.equal(first.projection, second.projection)
    model = copy.deepcopy(ref)
    swap_attention(model, "performer")
    assert model.layers[0].self_attn.attention.nb_features == PerformerKernel().nb_features

    model = copy.deepcopy(ref)
    swap_attention(model, "nystrom")
    inner, defaults = model.layers[0].self_attn.attention, NystromKernel()
    assert type(inner) is NystromAttention and inner.conv is None  # zero-shot: no fresh conv
    assert (inner.num_landmarks, inner.pinv_iterations) == (defaults.num_landmarks,
                                                            defaults.pinv_iterations)


def test_swap_attention_argument_errors():
    names = r"\['hybrid_window', 'nystrom', 'performer', 'softmax'\]"
    with pytest.raises(ValueError, match="expected one of " + names):
        swap_attention(encoder(True), "perfomer")
    with pytest.raises(TypeError, match="nb_feature"):
        swap_attention(encoder(True), "performer", nb_feature=16)
    with pytest.raises(TypeError, match="go with a kernel name.*functools.partial"):
        swap_attention(encoder(True), SoftmaxAttention, nb_features=16)
    with pytest.raises(TypeError, match="a PerformerAttention instance.*pass PerformerAttention"):
        swap_attention(encoder(True), PerformerAttention(D, H))
    with pytest.raises(TypeError, match="got a SoftmaxAttention instance"):
        MultiheadAttentionCompat(SoftmaxAttention(D, H), D, H)
    with pytest.raises(ValueError, match="no nn.MultiheadAttention to replace in Linear"):
        swap_attention(nn.Linear(3, 3), SoftmaxAttention)
    model = encoder(True)
    with pytest.raises(ValueError, match="where= rejected all 2"):
        swap_attention(model, SoftmaxAttention, where=lambda path, module: False)
    swap_attention(model, SoftmaxAttention)
    with pytest.raises(ValueError, match="holds 2 MultiheadAttentionCompat already"):
        swap_attention(model, SoftmaxAttention)


def test_compat_rejects_mixed_batched_and_unbatched_inputs():
    ours = MultiheadAttentionCompat(SoftmaxAttention, D, H, batch_first=True, path="dec.attn")
    q = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"dec\.attn: expected query, key and value all 3-D"):
        ours(q, torch.randn(5, D), torch.randn(5, D))
    with pytest.raises(ValueError, match=r"\(5, 32\), \(2, 5, 32\)"):
        ours(q[0], q, q)


def test_fast_path_attributes():
    ours = MultiheadAttentionCompat(SoftmaxAttention, D, H, batch_first=True)
    assert ours._qkv_same_embed_dim is False
    assert (ours.embed_dim, ours.num_heads, ours.batch_first) == (D, H, True)
    assert ours.in_proj_bias.shape == (3 * D,)
    assert MultiheadAttentionCompat(SoftmaxAttention, D, H, bias=False).in_proj_bias is None


def test_dtype_device_and_mode_are_kept():
    ref = nn.MultiheadAttention(D, H, batch_first=True).double().eval()
    ours = MultiheadAttentionCompat.from_torch(ref, SoftmaxAttention)
    assert ours.attention.q_proj.weight.dtype == torch.float64 and not ours.training
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(ours(x, x, x)[0], ref(x, x, x)[0], atol=1e-10, rtol=0)


@given(blocked=st.floats(0.0, 0.6), with_bias=st.booleans(), use_min=st.booleans())
def test_split_additive_is_exact(blocked, with_bias, use_min):
    """softmax(s + mask) == softmax over allowed entries of (s + bias), for any float mask."""
    logits = torch.randn(4, 6)
    low = torch.finfo(torch.float32).min if use_min else float("-inf")
    mask = torch.randn(4, 6) if with_bias else torch.zeros(4, 6)
    mask = mask.masked_fill(torch.rand(4, 6) < blocked, low)
    mask[:, 0] = 0.0  # every row keeps a key
    allowed, bias = split_additive(mask)
    bias = settle_bias(bias, takes_bias=True, message="")  # eager: None when all zeros
    assert (bias is None) == (not with_bias)
    ours = torch.softmax((logits + (0 if bias is None else bias)).masked_fill(~allowed, -torch.inf),
                         dim=-1)
    torch.testing.assert_close(ours, torch.softmax(logits + mask, dim=-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attention", [SoftmaxAttention, functools.partial(
    PerformerAttention, nb_features=16), functools.partial(NystromAttention, num_landmarks=4,
                                                          conv_kernel=None)],
    ids=["softmax", "performer", "nystrom"])
def test_keys_and_values_of_different_widths(attention):
    """kdim != vdim: keys and values get one projection each, with torch's weights."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(D, H, kdim=16, vdim=24, batch_first=True)
    ours = MultiheadAttentionCompat.from_torch(ref, attention, path="dec.cross")
    q, k, v = torch.randn(3, 5, D), torch.randn(3, 7, 16), torch.randn(3, 7, 24)
    kpm = padding(3, 7)
    out, _ = ours(q, k, v, key_padding_mask=kpm, need_weights=False)
    out.sum().backward()
    assert ours.value_proj.weight.grad is not None and torch.isfinite(out).all()
    if attention is SoftmaxAttention:
        out_ref, _ = ref(q, k, v, key_padding_mask=kpm, need_weights=False)
        torch.testing.assert_close(out, out_ref, atol=TOL, rtol=0)
        torch.testing.assert_close(ours.in_proj_bias, ref.in_proj_bias)
        out_ref.sum().backward()
        torch.testing.assert_close(ours.value_proj.weight.grad, ref.v_proj_weight.grad,
                                   atol=TOL, rtol=0)
        torch.testing.assert_close(ours.attention.kv_proj.weight.grad, ref.k_proj_weight.grad,
                                   atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"dec\.cross: expected .* value \(N, S, 24\)"):
        ours(q, k, k)


# -- torch.compile ------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a loaded machine
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("attention, masks", [
    (SoftmaxAttention, "padding"),
    (functools.partial(PerformerAttention, nb_features=16), "causal+padding"),
], ids=["softmax-padding", "performer-causal+padding"])
def test_compile_fullgraph_swapped_encoder_with_padding(fresh_dynamo, attention, masks):
    """No branch on mask values: one graph, outputs equal eager (torch passes float masks)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = encoder(batch_first=False)
    swap_attention(model, attention)
    x, kw = torch.randn(9, 3, D), {"src_key_padding_mask": padding(3, 9)}
    if "causal" in masks:  # boolean like the padding mask (torch warns on mixed types)
        kw.update(mask=torch.ones(9, 9, dtype=torch.bool).triu(1), is_causal=True)
    counter = CompileCounter()
    out = torch.compile(model, fullgraph=True, backend=counter)(x, **kw)
    assert counter.frame_count == 1
    torch.testing.assert_close(out, model(x, **kw), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_compiled_mask_assumptions_are_checked_at_run_time(fresh_dynamo):
    """What eager decides from mask values, a compiled call checks with our message."""
    x = torch.randn(3, 6, D)
    performer = MultiheadAttentionCompat(functools.partial(PerformerAttention, nb_features=16),
                                         D, H, batch_first=True, path="enc.attn")
    run = torch.compile(lambda kpm: performer(x, x, x, key_padding_mask=kpm)[0], fullgraph=True,
                        backend="eager")
    zero_or_blocked = torch.zeros(3, 6).masked_fill(padding(3, 6), float("-inf"))
    torch.testing.assert_close(run(zero_or_blocked), performer(x, x, x, key_padding_mask=(
        zero_or_blocked != 0))[0], atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match=r"enc\.attn: got a float additive mask"):
        run(zero_or_blocked + 0.5)
    softmax = MultiheadAttentionCompat(SoftmaxAttention, D, H, batch_first=True, path="enc.sm")
    run = torch.compile(lambda am: softmax(x, x, x, attn_mask=am, is_causal=True)[0],
                        fullgraph=True, backend="eager")
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    torch.testing.assert_close(run(causal), softmax(x, x, x, attn_mask=causal)[0], atol=1e-6,
                               rtol=0)
    with pytest.raises(RuntimeError, match=r"enc\.sm: is_causal=True but attn_mask is not"):
        run(causal.T.contiguous())
