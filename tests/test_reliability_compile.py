"""torch.compile: every kernel and the encoder with every attention × encoding pair compile
with ``fullgraph=True`` (any graph break raises), match eager, do not recompile across steps
of one shape, and recompile a bounded number of times over dynamic sequence lengths.

Graph-break and recompile checks use dynamo's counting backend (``CompileCounter``: it runs
the captured graph eagerly, so it is fast and counts compiled frames); backward tracing uses
``aot_eager``; one inductor run checks generated-code numerics.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reliability_cases import (
    REDRAW_OPTIONS,
    attention_classes,
    attention_factory,
    attention_kernels,
    encoder_config,
    encoding_classes,
    kernel_case,
    kernel_names,
    padding_mask,
    pair_id,
    pairs,
)
from torch._dynamo.testing import CompileCounter

from transformer_zoo import Encoder, Place, SoftmaxAttention
from transformer_zoo.functional import causal_linear_scan, draw_projection, favor_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads spin against each other on a loaded
    2-core machine and run these sizes up to 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _clone_args(args, kwargs, grad=False):
    def c(t):
        if isinstance(t, torch.Tensor):
            t = t.detach().clone()
            if grad and t.is_floating_point():
                t.requires_grad_(True)
        return t

    return tuple(c(a) for a in args), {k: c(v) for k, v in kwargs.items()}


def _tensors(out):
    """Outputs as a flat tuple of tensors (dataclass states such as FavorState included)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, (tuple, list)):
        return tuple(t for o in out for t in _tensors(o))
    return ()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", kernel_names())
def test_kernel_compiles_fullgraph_and_matches_eager(name):
    case = kernel_case(name)  # unknown kernels fail here, loudly
    fn = getattr(__import__("transformer_zoo").functional, name)
    args, kwargs = case.example()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    expected = fn(*args, **kwargs)
    for _ in range(2):  # same shapes twice: one frame
        got = compiled(*args, **kwargs)
    assert counter.frame_count == 1
    got, expected = _tensors(got), _tensors(expected)
    assert len(got) == len(expected) > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", attention_kernels())
def test_attention_kernel_backward_traces(name):
    case = kernel_case(name)
    fn = getattr(__import__("transformer_zoo").functional, name)
    args, kwargs = case.example()
    e_args, e_kwargs = _clone_args(args, kwargs, grad=True)
    c_args, c_kwargs = _clone_args(args, kwargs, grad=True)
    _first(fn(*e_args, **e_kwargs)).square().sum().backward()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    _first(compiled(*c_args, **c_kwargs)).square().sum().backward()
    # the blockwise kernel runs eagerly on its log-sum-exp Function (fused CPU flash kernel)
    # and compiled on its checkpointed blocks: the same math, a different fp32 rounding
    atol = 1e-5 if name == "blockwise_softmax_attention" else 1e-6
    for e, c in zip(e_args, c_args, strict=True):
        if isinstance(e, torch.Tensor) and e.requires_grad:
            torch.testing.assert_close(c.grad, e.grad, rtol=1e-5, atol=atol)


def _inputs(n: int, seed: int = 0, b: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), padding_mask(b, n, g)


@pytest.mark.cpu_only
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_encoder_compiles_fullgraph_without_recompiles(pair):
    """Train mode, three steps of one shape (fwd + bwd): one frame, outputs equal eager.

    Catches graph breaks (fullgraph raises), caches or counters that change guards between
    steps (RoPE tables, random-feature redraw steps), and wrong compiled numerics.
    """
    torch.manual_seed(0)
    enc = Encoder(encoder_config(*pair, n_layers=1))  # dropout 0: train mode is deterministic
    counter = CompileCounter()
    compiled = torch.compile(enc, backend=counter, fullgraph=True)
    for step in range(3):
        x, mask = _inputs(7, seed=step)
        out = compiled(x, mask=mask)
        out.square().sum().backward()
        torch.testing.assert_close(out, enc(x, mask=mask), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} frames for one shape"


@pytest.mark.cpu_only
@pytest.mark.parametrize("cls", attention_classes(), ids=lambda c: c.__name__)
def test_encoder_compiles_fullgraph_under_bf16_autocast(cls):
    """Training in bf16 under compile: autocast regions and the kernels' own fp32 islands
    (autocast disabled inside) trace without breaks; forward + backward equal eager."""
    torch.manual_seed(0)
    enc = Encoder(encoder_config(cls, None, n_layers=1))
    counter = CompileCounter()
    compiled = torch.compile(enc, backend=counter, fullgraph=True)
    x, mask = _inputs(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, mask=mask)
        expected = enc(x, mask=mask)
    out.float().square().sum().backward()
    assert counter.frame_count == 1
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cpu_only
@pytest.mark.parametrize(
    "cls", [c for c in attention_classes() if c.__name__ in REDRAW_OPTIONS],
    ids=lambda c: c.__name__,
)
def test_random_feature_redraw_under_compile_matches_eager(cls):
    """A redraw reads a step counter and seeds a torch.Generator, which no graph can hold: it
    runs eagerly (one graph break per layer, so not fullgraph). Frames stay fixed after the
    first step (the counter is not guarded on), and W and outputs equal eager training."""
    def build():
        torch.manual_seed(0)
        factory = attention_factory(cls, **REDRAW_OPTIONS[cls.__name__])
        return Encoder(encoder_config(cls, None, n_layers=2, attention=factory)).train()

    compiled_model, eager = build(), build()
    counter = CompileCounter()
    compiled = torch.compile(compiled_model, backend=counter)
    for step in range(3):
        x, mask = _inputs(7, seed=step)
        torch.testing.assert_close(compiled(x, mask=mask), eager(x, mask=mask),
                                   rtol=1e-6, atol=1e-6)
        for (name, a), b in zip(compiled_model.named_buffers(), eager.buffers(), strict=True):
            assert torch.equal(a, b), f"step {step}: {name} differs from eager"
        if step == 0:
            frames = counter.frame_count
    assert counter.frame_count == frames, "recompiled across redraw steps"


# (batch, length): both change; eight lengths, so one compile per length would show
DYNAMIC_SHAPES = ((2, 5), (3, 7), (4, 11), (2, 12), (3, 16), (2, 23), (4, 31), (2, 40))


def _dynamic_cases():
    """Every attention × compatible encoding pair, bidirectional and (where defined) causal."""
    return [(att, enc, causal) for att, enc in pairs() for causal in (False, True)
            if not causal or att.supports_causal]


def _dynamic_id(case):
    return f"{pair_id(case[:2])}-{'causal' if case[2] else 'bidirectional'}"


@pytest.mark.cpu_only
@pytest.mark.parametrize("case", _dynamic_cases(), ids=_dynamic_id)
def test_dynamic_shapes_compile_at_most_twice_over_eight_lengths(case):
    """fullgraph=True over eight (batch, length) shapes: the first compiles static, the
    second dynamic, then none — no Python loop or guard may specialise on the length (causal
    Performer compiled once per length before its scan became an opaque custom op)."""
    att, enc, causal = case
    torch.manual_seed(0)
    enc_model = Encoder(encoder_config(att, enc, n_layers=1, causal=causal)).eval()
    counter = CompileCounter()
    compiled = torch.compile(enc_model, backend=counter, fullgraph=True)
    for i, (b, n) in enumerate(DYNAMIC_SHAPES):
        x, mask = _inputs(n, seed=n, b=b)
        out = compiled(x, mask=mask)
        if i in (0, 1, len(DYNAMIC_SHAPES) - 1):  # static, dynamic and a late graph: = eager
            torch.testing.assert_close(out, enc_model(x, mask=mask), rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2, (
        f"{counter.frame_count} compiles over (batch, length) {DYNAMIC_SHAPES}; expected <= 2"
    )


@pytest.mark.cpu_only
@pytest.mark.parametrize("lengths", [(None, None), (3, None)], ids=["self", "cross"])
def test_causal_favor_kernels_compile_at_most_twice_over_lengths(lengths):
    """The causal FAVOR kernel itself (fused custom op, cross lengths, padding; forward and
    backward) and the generic scan: at most 2 graphs over eight lengths, equal to eager."""
    w = draw_projection(16, 8, seed=0)

    def favor(q, k, v, mask):
        return favor_attention(q, k, v, w, causal=True, key_padding_mask=mask, chunk_size=4)

    counters = [CompileCounter(), CompileCounter()]
    fns = [torch.compile(favor, backend=counters[0], fullgraph=True),
           torch.compile(causal_linear_scan, backend=counters[1], fullgraph=True)]
    for n in (5, 7, 9, 12, 16, 23, 31, 40):
        g = torch.Generator().manual_seed(n)
        m = n + lengths[0] if lengths[0] else n
        q = torch.randn(2, 2, n, 8, generator=g, requires_grad=True)
        k, v = (torch.randn(2, 2, m, 8, generator=g, requires_grad=True) for _ in range(2))
        mask = padding_mask(2, m, g)
        got = fns[0](q, k, v, mask)
        torch.testing.assert_close(got, favor(q, k, v, mask), rtol=1e-5, atol=1e-6)
        got.sum().backward()
        a, b = torch.rand(2, 2, n, 5, generator=g).unbind(0)
        gg = torch.rand(2, n, 5, generator=g).cumsum(-2)
        x = torch.randn(2, n, 3, generator=g)
        torch.testing.assert_close(fns[1](a, b, x, gg, chunk=4),
                                   causal_linear_scan(a, b, x, gg, chunk=4))
    frames = [c.frame_count for c in counters]
    assert max(frames) <= 2, f"{frames} compiles (favor_attention, causal_linear_scan)"


@pytest.mark.cpu_only
@pytest.mark.slow
def test_encoder_inductor_matches_eager():
    """One real inductor compile (slow on CPU, so forward only): generated code agrees."""
    qk = [e for e in encoding_classes() if e.place is Place.QK]
    pair = (SoftmaxAttention, qk[0] if qk else None)
    torch.manual_seed(0)
    enc = Encoder(encoder_config(*pair, n_layers=1)).eval()
    x, mask = _inputs(6)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(enc, fullgraph=True)(x, mask=mask),
                                   enc(x, mask=mask), rtol=1e-4, atol=1e-5)
