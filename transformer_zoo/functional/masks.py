"""Boolean attention masks (True = may attend) and their combination.

Shapes: b batch, h heads, n query length, m key length. Every mask here is boolean with
True = the query may attend to the key, as in ``F.scaled_dot_product_attention`` and HF.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
    """Causal mask ``(n, m)`` aligned bottom-right: query i sees keys j <= i + (m - n).

    With n == m this is the usual lower triangle. With n < m (queries are the last n tokens
    of a longer sequence, as in decoding with a cache) query i sits at absolute position
    i + m - n. Note SDPA's ``is_causal`` aligns top-left instead; we never rely on it when
    n != m.
    """
    i = torch.arange(q_len, device=device).unsqueeze(-1)  # (n, 1)
    j = torch.arange(k_len, device=device)  # (m,)
    return j <= i + (k_len - q_len)  # (n, m)


def padding_to_attn_mask(key_padding_mask: Tensor) -> Tensor:
    """Key padding mask ``(b, m)`` (True = real token) -> ``(b, 1, 1, m)`` attention mask."""
    return key_padding_mask[:, None, None, :]


def merge_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of boolean masks that broadcast together; ``None`` entries are skipped."""
    out: Tensor | None = None
    for mask in masks:
        if mask is None:
            continue
        out = mask if out is None else out & mask
    return out
