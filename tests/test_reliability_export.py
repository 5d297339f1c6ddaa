"""torch.export and TorchScript.

``torch.export.export`` captures every exported module, the ``Encoder`` with every attention ×
encoding pair, and ``nn`` models swapped to our attention; the exported program equals eager,
and batch size and sequence length stay dynamic (``torch.export.Dim``) where the module has
no shape branch (Nyström: lengths above ``num_landmarks``, where it approximates).
``torch.jit.script`` of any of them raises our RuntimeError naming ``torch.export`` instead of
failing deep inside the TorchScript frontend.
"""

from __future__ import annotations

import functools

import pytest
import torch
from reliability_cases import (
    ATTENTION_OPTIONS,
    SMALL,
    encoder_config,
    module_case,
    module_classes,
    padding_mask,
    pair_id,
    pairs,
)
from torch import Tensor, nn
from torch.export import Dim

from transformer_zoo import (
    Encoder,
    FeedForward,
    HybridWindowAttention,
    NystromAttention,
    PerformerAttention,
    SoftmaxAttention,
    SwiGLUFeedForward,
)
from transformer_zoo.interop import MultiheadAttentionCompat, swap_attention

pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

#: Modules TorchScript compiles as they are (plain Linear/activation stacks): left scriptable.
SCRIPTABLE = (FeedForward, SwiGLUFeedForward)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _flat(out: Tensor | tuple) -> Tensor:
    parts = out if isinstance(out, tuple | list) else (out,)
    return torch.cat([p.reshape(-1).double() for p in parts if p is not None])


def _assert_same(exported: nn.Module, eager: nn.Module, args: tuple, kwargs: dict) -> None:
    torch.testing.assert_close(_flat(exported(*args, **kwargs)), _flat(eager(*args, **kwargs)),
                               atol=1e-6, rtol=0)


def _recorded_call(module: nn.Module, run) -> tuple[tuple, dict]:
    """The (args, kwargs) of the module's first call while ``run()`` runs."""
    calls: list[tuple[tuple, dict]] = []
    handle = module.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args, kwargs)) if not calls else None,
        with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls[0]


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_every_module_exports(cls):
    """Every exported nn.Module (attentions, encodings, encoder parts, losses, Whitening)."""
    torch.manual_seed(0)
    case = module_case(cls)
    module = case.build(SMALL).eval()
    args, kwargs = _recorded_call(module, lambda: case.run(module, SMALL))
    program = torch.export.export(module, args, kwargs)
    _assert_same(program.module(), module, args, kwargs)


def _min_length(attention: type) -> int:
    """Shortest length one exported graph covers: Nyström switches to exact softmax at
    n <= num_landmarks (a shape branch), so its graph starts above it."""
    if issubclass(attention, NystromAttention):
        return ATTENTION_OPTIONS["NystromAttention"]["num_landmarks"] + 1
    return 2


def _inputs(b: int, n: int, seed: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, SMALL.d_model, generator=g),), {"mask": padding_mask(b, n, g)}


@pytest.mark.cpu_only
@pytest.mark.slow
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_encoder_exports_every_pair_with_dynamic_shapes(pair, request):
    """One graph for every batch size and length: equal to eager at the traced shape and at
    another (causal where the attention supports it)."""
    attention, encoding = pair
    if issubclass(attention, HybridWindowAttention):  # known limitation (docs/linearize.md)
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "the hybrid's block count ceil(n / w) is a derived dimension torch.export's "
            "constraint solver cannot express; static-shape export and dynamic compile work")))
    torch.manual_seed(0)
    config = encoder_config(attention, encoding, n_layers=1, causal=attention.supports_causal)
    model = Encoder(config).eval()
    lo = _min_length(attention)
    args, kwargs = _inputs(2, lo + 2, seed=0)
    b, n = Dim("b", min=1, max=64), Dim("n", min=lo, max=SMALL.max_len)
    program = torch.export.export(model, args, kwargs, dynamic_shapes={
        "x": {0: b, 1: n}, "mask": {0: b, 1: n}})
    for shape, seed in (((2, lo + 2), 0), ((3, lo + 6), 1)):
        _assert_same(program.module(), model, *_inputs(*shape, seed=seed))


SWAPS = {
    "softmax": (SoftmaxAttention, True),
    "performer": (functools.partial(PerformerAttention, nb_features=16), True),
    "nystrom": (functools.partial(NystromAttention, num_landmarks=4, conv_kernel=3), False),
}


def _torch_inputs(b: int, n: int, causal: bool, seed: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, SMALL.d_model, generator=g)
    kwargs: dict = {"src_key_padding_mask": ~padding_mask(b, n, g)}  # torch: True = pad
    if causal:  # boolean like the padding mask (torch warns on mixed types)
        kwargs.update(mask=torch.ones(n, n, dtype=torch.bool).triu(1), is_causal=True)
    return (x,), kwargs


@pytest.mark.cpu_only
@pytest.mark.parametrize("kernel", sorted(SWAPS))
def test_swapped_transformer_encoder_exports_with_dynamic_length(kernel):
    """nn.TransformerEncoder after swap_attention: padding (+ causal) masks, dynamic length."""
    attention, causal = SWAPS[kernel]
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(SMALL.d_model, SMALL.n_heads, 32, dropout=0.0,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    swap_attention(model, attention)
    model.eval()
    args, kwargs = _torch_inputs(2, 7, causal, seed=0)
    n = Dim("n", min=5, max=SMALL.max_len)
    dynamic = {"src": {1: n}, "src_key_padding_mask": {1: n}}
    if causal:
        dynamic.update(mask={0: n, 1: n}, is_causal=None)
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
    for length, seed in ((7, 0), (12, 1)):
        _assert_same(program.module(), model, *_torch_inputs(2, length, causal, seed))


@pytest.mark.cpu_only
def test_swapped_transformer_and_compat_export():
    """nn.Transformer (cross-attention, causal decoder) and direct MultiheadAttentionCompat
    calls (need_weights=True, kdim != vdim)."""
    torch.manual_seed(0)
    d, h = SMALL.d_model, SMALL.n_heads
    model = nn.Transformer(d, h, 1, 1, 32, dropout=0.0, batch_first=True)
    swap_attention(model, SoftmaxAttention)
    model.eval()
    g = torch.Generator().manual_seed(0)
    pad = ~padding_mask(2, 7, g)
    args = (torch.randn(2, 7, d, generator=g), torch.randn(2, 5, d, generator=g))
    kwargs = dict(tgt_mask=torch.ones(5, 5, dtype=torch.bool).triu(1), tgt_is_causal=True,
                  src_key_padding_mask=pad, memory_key_padding_mask=pad)
    _assert_same(torch.export.export(model, args, kwargs).module(), model, args, kwargs)

    compat = MultiheadAttentionCompat(SoftmaxAttention, d, h).eval()  # (L, N, E) inputs
    x = torch.randn(5, 2, d, generator=g)
    args = (x, x, x)
    _assert_same(torch.export.export(compat, args).module(), compat, args, {})
    cross = MultiheadAttentionCompat(SoftmaxAttention, d, h, kdim=8, vdim=12,
                                     batch_first=True).eval()
    args = (torch.randn(2, 5, d, generator=g), torch.randn(2, 6, 8, generator=g),
            torch.randn(2, 6, 12, generator=g))
    kwargs = dict(key_padding_mask=~padding_mask(2, 6, g), need_weights=False)
    _assert_same(torch.export.export(cross, args, kwargs).module(), cross, args, kwargs)


# -- TorchScript -------------------------------------------------------------------------------
SCRIPT_ERROR = r"torch\.jit\.script: .* TorchScript cannot compile .* torch\.export\.export"


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_jit_script_raises_our_error_naming_export(cls):
    module = module_case(cls).build(SMALL)
    if issubclass(cls, SCRIPTABLE):
        torch.jit.script(module)  # plain blocks stay scriptable
        return
    with pytest.raises(RuntimeError, match=SCRIPT_ERROR):
        torch.jit.script(module)


def test_jit_script_of_swapped_models_names_the_module():
    layer = nn.TransformerEncoderLayer(SMALL.d_model, SMALL.n_heads, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    swap_attention(model, SoftmaxAttention)
    with pytest.raises(RuntimeError, match=r"MultiheadAttentionCompat at 'layers\.0\.self_attn'"
                       r".*torch\.export"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match=SCRIPT_ERROR):
        torch.jit.script(MultiheadAttentionCompat(SoftmaxAttention, SMALL.d_model, SMALL.n_heads))
