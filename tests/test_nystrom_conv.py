"""Nyström's depthwise sequence convolution (functional/nystrom_conv.py) against F.conv2d."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_zoo import NystromAttention
from transformer_zoo.functional.nystrom_conv import depthwise_sequence_conv

F64 = torch.float64


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), half=st.integers(0, 17), heads=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_equals_conv2d_values_and_gradients(n, half, heads, seed):
    """Any length, including n shorter than the kernel (taps that reach no row), on a
    non-contiguous v (the module's head split of the projection): values, ∂v, ∂w as
    F.conv2d's in fp64."""
    k = 2 * half + 1
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(2, n, heads, 4, generator=gen, dtype=F64).transpose(1, 2).requires_grad_()
    w = torch.randn(heads, 1, k, 1, generator=gen, dtype=F64, requires_grad=True)
    got = depthwise_sequence_conv(v, w)
    want = F.conv2d(v, w, padding=(k // 2, 0), groups=heads)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(want.shape, generator=gen, dtype=F64)
    for a, b in zip(torch.autograd.grad(got, (v, w), g), torch.autograd.grad(want, (v, w), g),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_double_backward():
    v = torch.randn(1, 2, 9, 3, dtype=F64, requires_grad=True)
    w = torch.randn(2, 1, 5, 1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(depthwise_sequence_conv, (v, w))
    assert torch.autograd.gradgradcheck(depthwise_sequence_conv, (v, w))


def test_fp32_and_bf16_follow_conv2d_to_their_rounding():
    v = torch.randn(1, 2, 300, 8)
    w = torch.randn(2, 1, 33, 1) * 0.2
    want = F.conv2d(v.double(), w.double(), padding=(16, 0), groups=2)
    torch.testing.assert_close(depthwise_sequence_conv(v, w).double(), want, rtol=1e-5,
                               atol=1e-5)
    got = depthwise_sequence_conv(v.bfloat16(), w)  # fp32 accumulation, bf16 output
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=4e-2)


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight"):
        depthwise_sequence_conv(torch.randn(1, 2, 5, 3), torch.randn(2, 1, 4, 1))
    with pytest.raises(ValueError, match="weight"):
        depthwise_sequence_conv(torch.randn(1, 2, 5, 3), torch.randn(3, 1, 5, 1))


def test_module_output_and_gradients_unchanged_against_conv2d():
    """NystromAttention with the convolution: the same output and gradients as adding
    ``self.conv(v)`` (the nn.Conv2d the module keeps for its weight and state_dict)."""
    torch.manual_seed(0)
    model = NystromAttention(32, 2, num_landmarks=6, conv_kernel=5).to(F64)
    x = torch.randn(2, 40, 32, dtype=F64, requires_grad=True)
    got = model(x)
    grads = torch.autograd.grad(got.square().sum(), [x, *model.parameters()])
    original = NystromAttention.attend

    def attend_with_conv2d(self, q, k, v, **kw):
        conv, self.conv = self.conv, None
        try:
            out = original(self, q, k, v, **kw)
        finally:
            self.conv = conv
        return out + conv(v)

    NystromAttention.attend = attend_with_conv2d
    try:
        want = model(x)
        want_grads = torch.autograd.grad(want.square().sum(), [x, *model.parameters()])
    finally:
        NystromAttention.attend = original
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
