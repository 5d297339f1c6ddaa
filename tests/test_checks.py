"""Bad input raises ValueError/TypeError whose message names what was expected and received."""

from __future__ import annotations

import pytest
import torch

from transformer_zoo import (
    Encoder,
    EncoderConfig,
    LearnedPositionalEncoding,
    SoftmaxAttention,
)
from transformer_zoo._checks import (
    check_broadcastable,
    check_positive_int,
    check_probability,
)
from transformer_zoo.functional import softmax_attention

q4 = torch.randn(1, 2, 3, 4)


# -- kernel ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kw", "error", "match"),
    [
        ((torch.randn(2, 3, 4), q4, q4), {}, ValueError,
         r"q: expected a 4-D tensor \(batch, heads, seq, head_dim\), got shape \(2, 3, 4\)"),
        ((q4, q4, torch.randn(1, 2, 3)), {}, ValueError, r"v: expected a 4-D .*got shape"),
        ((q4, q4.double(), q4), {}, TypeError,
         "q and k must share a dtype, got torch.float32 and torch.float64"),
        ((q4, q4, q4.half()), {}, TypeError, "q and v must share a dtype"),
        ((q4.long(), q4.long(), q4.long()), {}, TypeError,
         "q: expected a floating-point tensor, got dtype torch.int64"),
        ((q4, torch.randn(1, 2, 3, 5), q4), {}, ValueError,
         "q and k must share head_dim: q has 4, k has 5"),
        ((q4, q4, torch.randn(1, 2, 6, 4)), {}, ValueError,
         r"v must match k in heads and length .*got \(1, 2, 6, 4\)"),
        ((q4, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)), {}, ValueError,
         "batch sizes differ"),
        ((torch.randn(1, 3, 3, 4), q4, q4), {}, ValueError,
         r"key/value heads \(2\) must divide query heads \(3\)"),
        ((q4, q4, q4), {"mask": torch.ones(1, 2, 3, 3)}, TypeError,
         "mask: expected a boolean mask .*got dtype torch.float32"),
        ((q4, q4, q4), {"mask": torch.ones(1, 2, 3, 5, dtype=torch.bool)}, ValueError,
         r"mask: expected a shape broadcastable to \(b, h, n, m\) = \(1, 2, 3, 3\), "
         r"got \(1, 2, 3, 5\)"),
        ((q4, q4, q4), {"mask": torch.ones(2, 1, 3, 3, dtype=torch.bool)}, ValueError,
         r"= \(1, 2, 3, 3\), got \(2, 1, 3, 3\)"),  # would grow the batch
        ((q4, q4, q4), {"mask": torch.ones(1, 1, 1, 3, 3, dtype=torch.bool)}, ValueError,
         r"got \(1, 1, 1, 3, 3\)"),  # too many dims
        ((q4, q4, q4), {"bias": torch.ones(3, 4)}, ValueError,
         r"bias: expected a shape broadcastable to .*got \(3, 4\)"),
        ((q4, q4, q4), {"bias": torch.ones(3, 3, dtype=torch.long)}, TypeError,
         "bias: expected a floating-point tensor"),
        ((q4, q4, q4), {"dropout_p": 1.0}, ValueError,
         r"dropout_p: expected a probability in \[0, 1\), got 1.0"),
        (([1.0], q4, q4), {}, TypeError, "q: expected a torch.Tensor, got list"),
    ],
)
def test_kernel_bad_input(args, kw, error, match):
    with pytest.raises(error, match=match):
        softmax_attention(*args, **kw)


# -- attention module --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"d_model": 10, "n_heads": 4}, ValueError,
         "d_model must be divisible by n_heads: got d_model=10, n_heads=4"),
        ({"d_model": 8, "n_heads": 0}, ValueError, "n_heads: expected a positive int, got 0"),
        ({"d_model": 8.0, "n_heads": 2}, TypeError, "d_model: expected an int, got float"),
        ({"d_model": 8, "n_heads": True}, TypeError, "n_heads: expected an int, got bool"),
        ({"d_model": 8, "n_heads": 2, "dropout": -0.1}, ValueError,
         r"dropout: expected a probability in \[0, 1\), got -0.1"),
        ({"d_model": 8, "n_heads": 2, "kv_dim": 0}, ValueError, "kv_dim: expected a positive"),
        ({"d_model": 8, "n_heads": 2, "positional": torch.nn.Linear(2, 2)}, TypeError,
         "positional: expected a transformer_zoo PositionalEncoding, got Linear"),
    ],
)
def test_attention_bad_construction(kw, error, match):
    with pytest.raises(error, match=match):
        SoftmaxAttention(**kw)


def test_attention_keyword_only_options():
    with pytest.raises(TypeError):
        SoftmaxAttention(8, 2, 0.1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        SoftmaxAttention(8, 2, dropuot=0.1)  # type: ignore[call-arg]


attn = SoftmaxAttention(8, 2)
x = torch.randn(2, 3, 8)


@pytest.mark.parametrize(
    ("inp", "kw", "error", "match"),
    [
        (torch.randn(3, 8), {}, ValueError,
         r"x: expected a 3-D tensor \(batch, seq, d_model\), got shape \(3, 8\)"),
        (torch.randn(2, 3, 6), {}, ValueError,
         r"x: expected last dim d_model=8, got \(2, 3, 6\)"),
        (x.double(), {}, TypeError,
         "x has dtype torch.float64 but the parameters are torch.float32"),
        (x.long(), {}, TypeError, "x: expected a floating-point tensor, got dtype torch.int64"),
        (x, {"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError,
         r"mask: expected a key padding mask of shape \(batch, k_len\) = \(2, 3\) .*"
         r"got \(2, 4\)"),
        (x, {"mask": torch.ones(2, 3)}, TypeError,
         "mask: expected a boolean mask .*got dtype torch.float32"),
        (x, {"mask": torch.ones(2, 1, 1, 3, dtype=torch.bool)}, ValueError,
         r"expected a key padding mask .*got \(2, 1, 1, 3\)"),
        (x, {"attn_mask": torch.ones(3, 4, dtype=torch.bool)}, ValueError,
         r"attn_mask: expected a shape broadcastable to \(b, h, n, m\) = \(2, 2, 3, 3\), "
         r"got \(3, 4\)"),
        (x, {"attn_mask": torch.zeros(3, 3)}, TypeError, "attn_mask: expected a boolean mask"),
        (x, {"positions": torch.arange(3, dtype=torch.int32)}, TypeError,
         "positions: expected int64 positions, got dtype torch.int32"),
        (x, {"positions": torch.arange(4)}, ValueError,
         r"positions: expected shape \(seq,\) = \(3,\) or \(batch, seq\) = \(2, 3\), "
         r"got \(4,\)"),
        (x, {"context": torch.randn(2, 5, 7)}, ValueError,
         r"context: expected \(batch, k_len, kv_dim\) = \(2, \*, 8\), got \(2, 5, 7\)"),
        (x, {"context": torch.randn(3, 5, 8)}, ValueError, r"= \(2, \*, 8\), got \(3, 5, 8\)"),
        (x, {"context": torch.randn(5, 8)}, ValueError, "context: expected a 3-D tensor"),
        (x, {"context": torch.randn(2, 5, 8).double()}, TypeError,
         "context has dtype torch.float64 but the parameters are torch.float32"),
        (x, {"context": torch.randn(2, 5, 8).half()}, TypeError,
         "context has dtype torch.float16 but the parameters are torch.float32"),
        (x, {"context": torch.ones(2, 5, 8, dtype=torch.int64)}, TypeError,
         "context: expected a floating-point tensor, got dtype torch.int64"),
        (x, {"context": torch.ones(2, 5, 8, dtype=torch.bool)}, TypeError,
         "context: expected a floating-point tensor, got dtype torch.bool"),
        (x, {"context": torch.randn(2, 5, 8, device="meta")}, ValueError,
         "context: expected device cpu"),
        (x, {"context": torch.randn(2, 5, 8), "context_positions": torch.arange(3)}, ValueError,
         r"context_positions: expected shape \(seq,\) = \(5,\) .*got \(3,\)"),
    ],
)
def test_attention_bad_forward(inp, kw, error, match):
    with pytest.raises(error, match=match):
        attn(inp, **kw)


@pytest.mark.cpu_only
@pytest.mark.parametrize("which", ["x", "context"])
def test_autocast_takes_what_it_casts_and_names_float64(which):
    cross = SoftmaxAttention(8, 2, kv_dim=6)
    c = torch.randn(2, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):  # autocast casts these
            inputs = {"x": x, "context": c}
            inputs[which] = inputs[which].to(dtype)
            assert cross(inputs["x"], context=inputs["context"]).dtype == torch.bfloat16
        inputs = {"x": x, "context": c}
        inputs[which] = inputs[which].double()
        with pytest.raises(TypeError, match=f"{which} has dtype torch.float64 but the "
                                            "parameters are torch.float32, and torch.autocast "
                                            "does not cast float64; cast it to torch.float32"):
            cross(inputs["x"], context=inputs["context"])


# -- encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"d_model": 30, "n_heads": 4}, ValueError,
         "d_model must be divisible by n_heads: got d_model=30, n_heads=4"),
        ({"n_layers": 0}, ValueError, "n_layers: expected a positive int, got 0"),
        ({"d_ff": 2.5}, TypeError, "d_ff: expected an int, got float"),
        ({"dropout": 1.2}, ValueError, r"dropout: expected a probability in \[0, 1\), got 1.2"),
        ({"attention_dropout": -1}, ValueError, "attention_dropout: expected a probability"),
        ({"attention": "softmax"}, TypeError, "attention: expected a class or factory"),
        ({"positional": "sinusoidal"}, TypeError,
         "positional: expected a PositionalEncoding instance, a zero-argument factory "
         "or None, got str"),
    ],
)
def test_encoder_config_bad_values(kw, error, match):
    with pytest.raises(error, match=match):
        EncoderConfig(**kw)


def test_encoder_bad_parts():
    with pytest.raises(TypeError, match="config: expected EncoderConfig, got dict"):
        Encoder({"d_model": 8})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="positional factory returned Linear"):
        Encoder(EncoderConfig(d_model=8, n_heads=2, positional=lambda: torch.nn.Linear(1, 1)))
    with pytest.raises(TypeError, match="attention factory must build a transformer_zoo "
                                        "MultiHeadAttention, got Linear"):
        Encoder(EncoderConfig(d_model=8, n_heads=2,
                              attention=lambda d, h, **kw: torch.nn.Linear(d, d)))


enc = Encoder(EncoderConfig(d_model=8, n_heads=2, n_layers=1,
                            positional=LearnedPositionalEncoding(4, 8)))


@pytest.mark.parametrize(
    ("inp", "kw", "error", "match"),
    [
        (torch.randn(2, 3, 4, 8), {}, ValueError,
         r"x: expected a 3-D tensor \(batch, seq, d_model\), got shape \(2, 3, 4, 8\)"),
        (torch.randn(2, 3, 5), {}, ValueError, r"expected last dim d_model=8, got \(2, 3, 5\)"),
        (torch.randn(2, 3, 8), {"mask": torch.ones(3, 2, dtype=torch.bool)}, ValueError,
         r"= \(2, 3\) with True = real token, got \(3, 2\)"),
        (torch.randn(2, 3, 8), {"mask": torch.ones(2, 3, dtype=torch.int64)}, TypeError,
         "mask: expected a boolean mask"),
        (torch.randn(2, 3, 8).double(), {}, TypeError,
         "x has dtype torch.float64 but the parameters are torch.float32"),
        # the learned table has 4 rows: a sequence of 6 runs past it
        (torch.randn(1, 6, 8), {}, ValueError,
         r"positions: expected values in \[0, max_len\) = \[0, 4\), got range \[0, 5\]"),
        (torch.randn(1, 3, 8), {"positions": torch.tensor([[2, 3, 4]])}, ValueError,
         r"= \[0, 4\), got range \[2, 4\]"),
        (torch.randn(1, 3, 8), {"positions": torch.tensor([0.0, 1.0, 2.0])}, TypeError,
         "positions: expected int64 positions, got dtype torch.float32"),
    ],
)
def test_encoder_bad_forward(inp, kw, error, match):
    with pytest.raises(error, match=match):
        enc(inp, **kw)


@pytest.mark.parametrize(
    ("shape", "view"),
    [((), (1, 1, 1, 1)), ((5,), (1, 1, 1, 5)), ((1,), (1, 1, 1, 1)), ((4, 1), (1, 1, 4, 1)),
     ((3, 4, 5), (1, 3, 4, 5)), ((2, 1, 4, 5), (2, 1, 4, 5))],
)
def test_check_broadcastable_returns_a_full_rank_view(shape, view):
    t = torch.rand(shape)
    out = check_broadcastable(t, "t", (2, 3, 4, 5), "(b, h, n, m)")
    assert out.shape == view
    assert out.data_ptr() == t.data_ptr() and torch.equal(out.reshape(shape), t)  # a view


def test_check_helpers_directly():
    with pytest.raises(ValueError, match=r"expected a shape broadcastable to L = \(2, 3\), "
                                          r"got \(4,\)"):
        check_broadcastable(torch.ones(4), "t", (2, 3), "L")
    check_broadcastable(torch.ones(1, 3), "t", (2, 3), "L")
    with pytest.raises(TypeError, match="t: expected a torch.Tensor, got float"):
        check_broadcastable(1.0, "t", (2, 3), "L")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got \(1, 2, 3\) \(at most 2 dims; trailing dims "
                                          r"aligned, each equal to the target's or 1\)"):
        check_broadcastable(torch.ones(1, 2, 3), "t", (2, 3), "L")
    assert check_positive_int(3, "n") == 3
    with pytest.raises(ValueError, match="n: expected a positive int, got -2"):
        check_positive_int(-2, "n")
    assert check_probability(0, "p") == 0.0
    with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\), got 2"):
        check_probability(2, "p")
