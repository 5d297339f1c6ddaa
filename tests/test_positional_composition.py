"""Every attention × every encoding: it either runs (shapes, finite, backward) or raises the
compatibility ValueError at construction. Plus translation invariance of the relative
encodings, the sinusoidal shift property and the docs' compatibility table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transformer_zoo
from transformer_zoo import (
    ALiBi,
    Encoder,
    EncoderConfig,
    LearnedPositionalEncoding,
    MultiHeadAttention,
    Place,
    RotaryEmbedding,
    RotaryLayout,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    compatibility_table,
    supports,
)
from transformer_zoo.positional.sinusoidal import sinusoidal_encoding

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8

ATTENTIONS = sorted(
    (c for c in vars(transformer_zoo).values()
     if isinstance(c, type) and issubclass(c, MultiHeadAttention) and c is not MultiHeadAttention),
    key=lambda c: c.__name__,
)


class InputAndRotaryOnly(transformer_zoo.SoftmaxAttention):
    """A stand-in for kernels that take only input and q/k encodings (Performer, Nyström),
    so the rejection branch is exercised even before they are exported."""

    accepts = frozenset({Place.INPUT, Place.QK})


ENCODINGS = {
    "none": lambda causal: None,
    "sinusoidal": lambda causal: SinusoidalPositionalEncoding(D_MODEL),
    "learned": lambda causal: LearnedPositionalEncoding(16, D_MODEL),
    "rope-interleaved": lambda causal: RotaryEmbedding(head_dim=HEAD_DIM),
    "rope-half-partial": lambda causal: RotaryEmbedding(
        head_dim=HEAD_DIM, rotary_dim=4, layout=RotaryLayout.HALF_SPLIT, ntk_factor=2.0),
    "shaw": lambda causal: ShawRelativePosition(head_dim=HEAD_DIM, max_distance=3),
    "t5": lambda causal: T5RelativeBias(n_heads=HEADS, causal=causal),
    "alibi": lambda causal: ALiBi(n_heads=HEADS, causal=causal),
}


def build(attention, encoding, causal, n_layers=1):
    return Encoder(EncoderConfig(d_model=D_MODEL, n_heads=HEADS, n_layers=n_layers, dropout=0.0,
                                 attention=attention, positional=encoding, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("attention", [*ATTENTIONS, InputAndRotaryOnly], ids=lambda c: c.__name__)
def test_every_pair_runs_or_is_rejected_at_construction(attention, name, causal):
    encoding = ENCODINGS[name](causal)
    if causal and not attention.supports_causal:
        with pytest.raises(ValueError, match="causal"):
            build(attention, encoding, causal)
        return
    if encoding is not None and not supports(attention, type(encoding)):
        with pytest.raises(ValueError) as err:
            build(attention, encoding, causal)
        message = str(err.value)
        assert attention.__name__ in message and type(encoding).__name__ in message
        if type(encoding).place.value == "bias":
            assert "RotaryEmbedding" in message
        return
    enc = build(attention, encoding, causal)
    x = torch.randn(2, 7, D_MODEL, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 0, 0]])
    out = enc(x, mask=mask, positions=positions)
    assert out.shape == (2, 7, D_MODEL) and out.isfinite().all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    for p in enc.parameters():
        assert p.grad is None or p.grad.isfinite().all()


RELATIVE = ["rope-interleaved", "rope-half-partial", "shaw", "t5", "alibi"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", RELATIVE)
def test_translation_invariance(name, causal):
    """With only a relative encoding, shifting every position by a constant changes nothing."""
    attention = transformer_zoo.SoftmaxAttention
    enc = build(attention, ENCODINGS[name](causal), causal, n_layers=2).eval()
    x = torch.randn(2, 9, D_MODEL)
    base = enc(x, positions=torch.arange(9))
    for shift in (1, 37, 1000):
        shifted = enc(x, positions=torch.arange(9) + shift)
        torch.testing.assert_close(shifted, base, rtol=2e-4, atol=2e-4)
    batched = torch.stack((torch.arange(9) + 5, torch.arange(9) + 500))
    torch.testing.assert_close(enc(x, positions=batched), base, rtol=2e-4, atol=2e-4)


@given(p=st.integers(0, 2000), k=st.integers(-500, 2000), half=st.integers(1, 16))
def test_sinusoidal_shift_is_a_fixed_block_rotation(p, k, half):
    """PE(p + k) = M_k PE(p), M_k block-diagonal 2×2 rotations by k·ω_i, independent of p."""
    d = 2 * half
    omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = (k * omega).cos(), (k * omega).sin()
    # (sin, cos) pairs: sin(a+b) = sin a cos b + cos a sin b, cos(a+b) = cos a cos b − sin a sin b
    rot = torch.stack((torch.stack((c, s), -1), torch.stack((-s, c), -1)), -2)  # (d/2, 2, 2)
    pe_p = sinusoidal_encoding(torch.tensor([p]), d).double().view(half, 2, 1)
    want = (rot @ pe_p).flatten()
    got = sinusoidal_encoding(torch.tensor([p + k]), d).double()[0]
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)


def test_docs_table_matches_the_code():
    """docs/relative.md's compatibility table is what ``compatibility_table`` renders for the
    attention classes it lists."""
    text = (Path(__file__).parents[1] / "docs" / "relative.md").read_text()
    table = re.search(r"<!-- compat-table -->\n```text\n(.*?)```", text, re.S).group(1).strip()
    names = [c.strip() for c in table.splitlines()[0].strip("|").split("|")[2:]]
    attentions = [getattr(transformer_zoo, n) for n in names]
    encodings = [SinusoidalPositionalEncoding, LearnedPositionalEncoding, RotaryEmbedding,
                 ShawRelativePosition, T5RelativeBias, ALiBi]
    assert table == compatibility_table(attentions, encodings)


def test_architecture_table_is_the_full_current_table():
    """docs/architecture.md shows every exported attention × every exported encoding."""
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    table = re.search(r"<!-- compat-table -->\n```text\n(.*?)```", text, re.S).group(1).strip()
    exported = [getattr(transformer_zoo, name) for name in transformer_zoo.__all__]
    classes = [c for c in exported if isinstance(c, type)]
    attentions = [c for c in classes if issubclass(c, transformer_zoo.MultiHeadAttention)
                  and c is not transformer_zoo.MultiHeadAttention]
    bases = {transformer_zoo.PositionalEncoding, transformer_zoo.InputEncoding,
             transformer_zoo.QKTransform, transformer_zoo.LogitBias}
    encodings = [c for c in classes
                 if issubclass(c, transformer_zoo.PositionalEncoding) and c not in bases]
    assert table == compatibility_table(attentions, encodings)


@pytest.mark.parametrize("name", RELATIVE)
def test_attention_with_encoding_compiles_without_graph_breaks(name):
    attn = transformer_zoo.SoftmaxAttention(D_MODEL, HEADS, positional=ENCODINGS[name](False))
    x, pos = torch.randn(2, 7, D_MODEL), torch.arange(7) + 3
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, positions=pos), attn(x, positions=pos))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", RELATIVE)
def test_appended_padding_changes_nothing(name, causal):
    """Outputs at real tokens do not move when padded keys of any content are appended (the
    bias/rotation and the padding mask compose), with batched per-row position offsets."""
    enc = build(transformer_zoo.SoftmaxAttention, ENCODINGS[name](causal), causal).eval()
    x = torch.randn(2, 6, D_MODEL)
    pos = torch.stack((torch.arange(6), torch.arange(6) + 11))
    base = enc(x, positions=pos)
    junk = 100 * torch.randn(2, 3, D_MODEL)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    pos_padded = torch.cat((pos, torch.zeros(2, 3, dtype=torch.long)), dim=1)
    padded = enc(torch.cat((x, junk), dim=1), mask=mask, positions=pos_padded)
    torch.testing.assert_close(padded[:, :6], base, rtol=1e-4, atol=1e-4)
