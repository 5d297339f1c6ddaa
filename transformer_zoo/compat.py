"""Which attention kernel accepts which positional encoding: one table, read from the code.

Each attention class declares ``accepts`` (a set of ``Place``) and ``supports_causal``; each
encoding declares its ``place``. ``check_pair`` is what the modules and the encoder call at
construction; ``compatibility_table`` renders the same facts for the docs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from transformer_zoo.positional.base import Place, PositionalEncoding

if TYPE_CHECKING:
    from transformer_zoo.attention.multihead import MultiHeadAttention

_SUGGEST = {
    Place.BIAS: "use a rotary encoding (RotaryEmbedding) or an input-added one "
    "(SinusoidalPositionalEncoding, LearnedPositionalEncoding) instead",
    Place.QK: "use an input-added encoding instead",
    Place.INPUT: "use another encoding",
}


def supports(attention: type[MultiHeadAttention], encoding: type[PositionalEncoding]) -> bool:
    """True when ``attention`` accepts ``encoding``'s place of action."""
    return encoding.place in attention.accepts


def check_pair(
    attention: type[MultiHeadAttention], encoding: PositionalEncoding | type[PositionalEncoding]
) -> None:
    """Raise ValueError naming the pair and the alternatives when they cannot compose."""
    enc_cls = encoding if isinstance(encoding, type) else type(encoding)
    if not issubclass(enc_cls, PositionalEncoding):
        raise TypeError(
            f"positional: expected a transformer_zoo PositionalEncoding, got {enc_cls.__name__}"
        )
    if not supports(attention, enc_cls):
        accepted = ", ".join(sorted(p.value for p in attention.accepts))
        raise ValueError(
            f"{attention.__name__} cannot use {enc_cls.__name__}: it acts as a "
            f"'{enc_cls.place.value}' encoding and {attention.__name__} accepts only "
            f"{accepted}; {_SUGGEST[enc_cls.place]}"
        )


def compatibility_table(
    attentions: Iterable[type[MultiHeadAttention]],
    encodings: Iterable[type[PositionalEncoding]],
) -> str:
    """A Markdown table: rows are encodings, columns attentions, cells yes/no."""
    attentions, encodings = list(attentions), list(encodings)
    head = "| encoding | acts on | " + " | ".join(a.__name__ for a in attentions) + " |"
    rule = "|---|---|" + "---|" * len(attentions)
    rows = [
        f"| {e.__name__} | {e.place.value} | "
        + " | ".join("yes" if supports(a, e) else "no" for a in attentions)
        + " |"
        for e in encodings
    ]
    causal = "| (causal=True) | mask | " + " | ".join(
        "yes" if a.supports_causal else "no" for a in attentions
    ) + " |"
    return "\n".join([head, rule, *rows, causal])
