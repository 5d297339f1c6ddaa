"""two_pass_forward: one call on the doubled batch equals two calls when dropout is off."""

from collections import namedtuple

import pytest
import torch
from torch import nn

from transformer_zoo import Encoder, EncoderConfig
from transformer_zoo.regularizers import two_pass_forward


def test_equals_two_separate_calls_without_dropout() -> None:
    enc = Encoder(EncoderConfig(d_model=16, n_heads=2, n_layers=2, dropout=0.0))
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])
    y1, y2 = two_pass_forward(enc, x, mask=mask)  # keyword tensors are doubled too
    ref = enc(x, mask=mask)
    torch.testing.assert_close(y1, ref)
    torch.testing.assert_close(y2, ref)


def test_views_differ_with_dropout_in_train_mode() -> None:
    enc = Encoder(EncoderConfig(d_model=16, n_heads=2, n_layers=1, dropout=0.2)).train()
    x = torch.randn(4, 6, 16)
    y1, y2 = two_pass_forward(enc, x)
    assert y1.shape == y2.shape == (4, 6, 16)
    assert not torch.allclose(y1, y2)
    enc.eval()
    y1, y2 = two_pass_forward(enc, x)
    torch.testing.assert_close(y1, y2)


def test_shared_tensors_via_closure_and_structured_outputs() -> None:
    pos = torch.arange(5)  # (n,) shared by the batch: bound in the closure, not doubled
    Pair = namedtuple("Pair", "a b")

    def model(x: torch.Tensor, scale: float) -> tuple:
        y = x * scale + pos
        return Pair(y, {"sum": y.sum(-1), "none": None}), [y.mean(-1)]

    x = torch.randn(2, 5)
    first, second = two_pass_forward(model, x, scale=2.0)
    expected = x * 2.0 + pos
    for out in (first, second):
        assert isinstance(out[0], Pair) and isinstance(out[1], list)
        torch.testing.assert_close(out[0].a, expected)
        torch.testing.assert_close(out[0].b["sum"], expected.sum(-1))
        assert out[0].b["none"] is None


def test_errors() -> None:
    with pytest.raises(TypeError, match="callable"):
        two_pass_forward("model", torch.randn(2))
    with pytest.raises(TypeError, match="Tensor"):
        two_pass_forward(lambda x: "text", torch.randn(2, 3))
    with pytest.raises(ValueError, match="doubled batch"):
        two_pass_forward(lambda x: x.sum(), torch.randn(2, 3))
    with pytest.raises(ValueError, match="doubled batch"):
        two_pass_forward(lambda x: x[:3], torch.randn(2, 3))
    assert isinstance(two_pass_forward(nn.Identity(), torch.randn(2, 3))[0], torch.Tensor)
