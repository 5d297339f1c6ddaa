"""SoftmaxAttention with each positional encoding that acts inside attention.

``SoftmaxAttention + <encoding>`` beside plain ``SoftmaxAttention`` (contenders_softmax): the
same module (b = 1, d_model 512, 8 heads × 64, bidirectional, fp32) with RoPE, ALiBi, T5,
Shaw, Transformer-XL and DeBERTa (c2p + p2c, log buckets as in DeBERTa v2/v3). Logit biases
take the module's default path: materialised up to ``LONG_BIAS_ELEMENTS`` bias elements,
FlexAttention (CUDA, encodings with a ``score_mod``) or the exact blockwise kernel above
(``docs/attention.md``). The issue-16 targets (``attention_report.encoding_targets``): at the
longest length, each within 1.3x the time and 1.5x the peak memory of plain SoftmaxAttention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import transformer_zoo as tz
from benchmarks.common import BATCH, CPU, D_MODEL, HEAD_DIM, HEADS, ContenderFactory, Step, randn
from transformer_zoo import SoftmaxAttention
from transformer_zoo.positional.base import PositionalEncoding

PREFIX = "SoftmaxAttention + "


def _encodings() -> dict[str, Callable[[], PositionalEncoding]]:
    found: dict[str, Callable[[], PositionalEncoding]] = {
        "RoPE": lambda: tz.RotaryEmbedding(head_dim=HEAD_DIM),
        "ALiBi": lambda: tz.ALiBi(n_heads=HEADS),
        "T5": lambda: tz.T5RelativeBias(n_heads=HEADS),
        "Shaw": lambda: tz.ShawRelativePosition(head_dim=HEAD_DIM),
    }
    if hasattr(tz, "TransformerXLRelativePosition"):
        found["Transformer-XL"] = lambda: tz.TransformerXLRelativePosition(
            d_model=D_MODEL, n_heads=HEADS, head_dim=HEAD_DIM)
    if hasattr(tz, "DebertaRelativeBias"):
        found["DeBERTa"] = lambda: tz.DebertaRelativeBias(
            d_model=D_MODEL, n_heads=HEADS, position_buckets=256, max_relative_positions=512)
    return found


def _factory(make: Callable[[], PositionalEncoding],
             blockwise: bool | None = None) -> ContenderFactory:
    def build(n: int, device: torch.device = CPU) -> Step:
        attn = SoftmaxAttention(D_MODEL, HEADS, positional=make(), blockwise=blockwise).to(device)
        x = randn(BATCH, n, D_MODEL, device=device, requires_grad=True)
        return lambda: attn(x)

    return build


def contenders() -> dict[str, ContenderFactory]:
    """Each encoding on the default path, and the biases also materialised (``blockwise=
    False``: the path before issue 16, for the before/after table)."""
    found = {PREFIX + name: _factory(make) for name, make in _encodings().items()}
    found.update({f"{PREFIX}{name} (materialised)": _factory(make, blockwise=False)
                  for name, make in _encodings().items() if name != "RoPE"})
    return found
