"""FlexAttention path: every encoding's ``score_mod`` equals its ``forward`` at every
(b, h, i, j) (evaluated on index grids), ``flex_softmax_attention`` equals the materialised
kernel (forward on the CPU: torch 2.13's CPU FlexAttention has no backward), the module's
dispatch (flex only where it applies), and on CUDA forward + backward (skipped elsewhere)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import transformer_zoo.attention.softmax as softmax_module
from transformer_zoo import ALiBi, ShawRelativePosition, SoftmaxAttention, T5RelativeBias
from transformer_zoo.functional.flex import flex_softmax_attention
from transformer_zoo.functional.softmax import softmax_attention
from transformer_zoo.positional.base import LogitBias

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # flex's unfused CPU notice
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention on CUDA")


def encodings(causal: bool) -> list[LogitBias]:
    torch.manual_seed(0)
    t5 = T5RelativeBias(n_heads=3, causal=causal, num_buckets=8, max_distance=5)
    shaw = ShawRelativePosition(head_dim=4, max_distance=2)
    for p in (*t5.parameters(), *shaw.parameters()):
        nn.init.normal_(p)
    return [ALiBi(n_heads=3, causal=causal), t5, shaw]


def _grid(b: int, h: int, n: int, m: int):
    return (torch.arange(b).view(b, 1, 1, 1), torch.arange(h).view(1, h, 1, 1),
            torch.arange(n).view(1, 1, n, 1), torch.arange(m).view(1, 1, 1, m))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_score_mod_equals_forward_on_index_grids(causal, batched):
    b, h, n, m = 2, 3, 6, 9
    q = torch.randn(b, h, n, 4)
    k = torch.randn(b, h, m, 4)
    if batched:
        q_pos = torch.arange(n)[None] + torch.tensor([[3], [0]])
        k_pos = torch.arange(m)[None] + torch.tensor([[0], [7]])
    else:
        q_pos, k_pos = torch.arange(n) + 3, torch.arange(m)
    for enc in encodings(causal):
        mod = enc.score_mod(q, k, q_pos, k_pos)
        assert mod is not None, type(enc).__name__
        bias = mod(torch.zeros(b, h, n, m), *_grid(b, h, n, m))
        expected = enc(q, q_pos, k_pos).expand(b, h, n, m)
        torch.testing.assert_close(bias, expected, rtol=1e-6, atol=1e-6,
                                   msg=type(enc).__name__)
        score = torch.randn(b, h, n, m)
        torch.testing.assert_close(mod(score, *_grid(b, h, n, m)), score + expected)


def test_base_score_mod_is_none():
    class Plain(LogitBias):
        def forward(self, q, q_positions, k_positions):
            return torch.zeros(())

    assert Plain().score_mod(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                             torch.arange(1), torch.arange(1)) is None


def _materialised(q, k, v, enc, q_pos, k_pos, mask, causal):
    return softmax_attention(q, k, v, bias=enc(q, q_pos, k_pos), mask=mask, causal=causal)


@pytest.mark.cpu_only
@pytest.mark.slow  # FlexAttention's eager CPU reference traces each score_mod: ~3 s a call
@pytest.mark.parametrize(("causal", "mask_shape"), [(False, None), (True, (2, 1, 1, 9)),
                                                    (False, (6, 9)), (True, (2, 3, 6, 9))])
def test_flex_forward_equals_materialised_on_cpu(causal, mask_shape):
    g = torch.Generator().manual_seed(4)
    b, h, n, m = 2, 3, 6, 9  # cross lengths: causal is bottom-right aligned
    q = torch.randn(b, h, n, 4, generator=g, dtype=F64)
    k, v = (torch.randn(b, h, m, 4, generator=g, dtype=F64) for _ in range(2))
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g) < 0.7
    q_pos, k_pos = torch.arange(n) + 3, torch.arange(m)
    for enc in encodings(causal):
        enc = enc.double()
        out = flex_softmax_attention(q, k, v, score_mod=enc.score_mod(q, k, q_pos, k_pos),
                                     mask=mask, causal=causal)
        ref = _materialised(q, k, v, enc, q_pos, k_pos, mask, causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=type(enc).__name__)


@pytest.mark.cpu_only
def test_flex_gqa_and_dead_rows_on_cpu():
    q = torch.randn(1, 4, 5, 4, dtype=F64)
    k, v = (torch.randn(1, 2, 5, 4, dtype=F64) for _ in range(2))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[1] = False  # row 1 sees no key
    enc = ALiBi(n_heads=4)
    pos = torch.arange(5)
    out = flex_softmax_attention(q, k, v, score_mod=enc.score_mod(q, k, pos, pos), mask=mask)
    ref = _materialised(q, k, v, enc, pos, pos, mask, False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert (out[:, :, 1] == 0).all()


@pytest.mark.cpu_only
def test_module_flex_true_on_cpu_forward(monkeypatch):
    """flex=True takes FlexAttention for ALiBi and T5 (forward only on the CPU) and equals the
    materialised module; Shaw (value term) and dropout stay blockwise."""
    calls = []
    real = softmax_module.flex_softmax_attention
    monkeypatch.setattr(softmax_module, "flex_softmax_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 7, 12, dtype=F64)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    for i, enc in enumerate(encodings(True)):
        dense = SoftmaxAttention(12, 3, causal=True, positional=enc, blockwise=False).double()
        flex = copy.deepcopy(dense)
        flex.blockwise, flex.flex = True, True
        with torch.no_grad():
            torch.testing.assert_close(flex(x, mask=mask), dense(x, mask=mask), rtol=1e-10,
                                       atol=1e-12)
        assert len(calls) == (i + 1 if i < 2 else 2)  # Shaw: blockwise
    drop = SoftmaxAttention(12, 3, positional=ALiBi(n_heads=3), dropout=0.1, blockwise=True,
                            flex=True).double()
    with torch.no_grad():
        drop(x)
    assert len(calls) == 2  # dropout: blockwise


def test_module_flex_default_is_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(softmax_module, "flex_softmax_attention",
                        lambda *a, **kw: calls.append(1))
    attn = SoftmaxAttention(12, 3, positional=ALiBi(n_heads=3), blockwise=True)
    x = torch.randn(1, 5, 12)
    attn(x)
    assert calls == ([1] if x.is_cuda else [])


@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_flex_forward_backward_on_cuda(causal):
    """On CUDA (compiled FlexAttention): outputs and gradients, including T5's table, equal the
    materialised path (fp32 rounding)."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, n, m = 2, 3, 130, 130
    base = [torch.randn(b, h, n, 16, generator=g).to(dev) for _ in range(3)]
    mask = (torch.rand(b, 1, 1, m, generator=g) < 0.9).to(dev)
    pos = torch.arange(n, device=dev)
    for enc in encodings(causal)[:2]:
        enc = enc.to(dev)
        results = []
        for flex in (True, False):
            leaves = [t.clone().requires_grad_() for t in base]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if flex:
                    out = flex_softmax_attention(
                        *leaves, score_mod=enc.score_mod(leaves[0], leaves[1], pos, pos),
                        mask=mask, causal=causal)
                else:
                    out = _materialised(*leaves, enc, pos, pos, mask, causal)
            params = list(enc.parameters())
            results.append((out.detach(), torch.autograd.grad(out.square().sum(),
                                                              [*leaves, *params])))
        (o1, g1), (o2, g2) = results
        torch.testing.assert_close(o1, o2, rtol=2e-4, atol=2e-5)
        for a, r in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, r, rtol=2e-3, atol=2e-4)
