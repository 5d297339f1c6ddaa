"""Relative-position kernels: distances, T5 buckets, ALiBi slopes and biases, Shaw indices.

All take int64 positions ``(n,)`` or ``(b, n)`` for queries and ``(m,)`` or ``(b, m)`` for keys
and work on the relative position r = key position − query position (``relative_positions``),
so they hold for offsets, left padding and packed sequences alike.

Shapes: b batch, h heads, n query length, m key length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int, check_tensor


def relative_positions(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """r_ij = k_pos[j] − q_pos[i]: ``(n, m)``, or ``(b, n, m)`` if either is batched."""
    for name, p in (("q_positions", q_positions), ("k_positions", k_positions)):
        check_tensor(p, name)
        if p.dtype != torch.int64 or p.ndim not in (1, 2):
            raise TypeError(
                f"{name}: expected int64 positions of shape (seq,) or (batch, seq), got "
                f"dtype {p.dtype} and shape {tuple(p.shape)}"
            )
    return k_positions[..., None, :] - q_positions[..., :, None]


def t5_relative_bucket(
    relative_position: Tensor,
    *,
    causal: bool = False,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """T5's bucket of r = key − query position; int64 in [0, num_buckets).

    Bidirectional: half the buckets per direction, keys after the query offset by
    num_buckets/2. Causal: n = max(−r, 0) (keys after the query share bucket 0). With B the
    per-direction count and E = B/2: n < E is exact; otherwise
    E + ⌊log(n/E) / log(max_distance/E) · (B − E)⌋, clamped to B − 1.

    Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer", arXiv 1910.10683. Bit-equal to the Mesh TensorFlow / HF reference: the log
    is taken in fp32 in the same order of operations.
    """
    check_tensor(relative_position, "relative_position")
    check_positive_int(num_buckets, "num_buckets")
    check_positive_int(max_distance, "max_distance")
    per_direction = num_buckets if causal else num_buckets // 2
    max_exact = per_direction // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(
            f"num_buckets={num_buckets}, max_distance={max_distance}: need at least one exact "
            f"bucket per direction and max_distance > {max_exact} (the exact range)"
        )
    r = relative_position.long()
    if causal:
        offset = torch.zeros_like(r)
        n = (-r).clamp(min=0)
    else:
        offset = (r > 0).long() * per_direction
        n = r.abs()
    # log only where n >= max_exact (clamp keeps log(0) out; those entries take the exact path)
    large = max_exact + (
        torch.log(n.clamp(min=max_exact).float() / max_exact)
        / math.log(max_distance / max_exact)
        * (per_direction - max_exact)
    ).long()
    large = large.clamp(max=per_direction - 1)
    return offset + torch.where(n < max_exact, n, large)


def t5_bucket_lookup(
    relative_position: Tensor,
    *,
    causal: bool = False,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """``t5_relative_bucket`` by table lookup: the formula is evaluated once for every
    r in [−max_distance, max_distance] and r is clamped into that range (every distance at
    or past max_distance is in the last bucket either way), so the result is bit-equal and
    no logarithm is taken per (i, j)."""
    check_positive_int(max_distance, "max_distance")
    span = torch.arange(-max_distance, max_distance + 1, device=relative_position.device)
    table = t5_relative_bucket(span, causal=causal, num_buckets=num_buckets,
                               max_distance=max_distance)  # (2·max_distance + 1,)
    return table[relative_position.clamp(-max_distance, max_distance) + max_distance]


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes m_h, fp32 ``(n_heads,)``.

    For n a power of 2: m_h = 2^(−8h/n), h = 1..n (8 heads: 2^−1 … 2^−8). Otherwise the
    slopes of c = 2^⌊log2 n⌋ heads, then the slopes 2^(−8h/2c) for odd h = 1, 3, 5, … (they
    interleave with the first set), first n − c of them (12 heads: 2^−1 … 2^−8, then
    2^−0.5, 2^−1.5, 2^−2.5, 2^−3.5).

    Press et al. 2022, "Train Short, Test Long", arXiv 2108.12409, section 3.
    """
    check_positive_int(n_heads, "n_heads")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    c = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(c)
    if c < n_heads:
        slopes += power_of_two(2 * c)[0::2][: n_heads - c]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    slopes: Tensor, q_positions: Tensor, k_positions: Tensor, *, causal: bool = False
) -> Tensor:
    """ALiBi logit bias, fp32 ``(1|b, h, n, m)``.

    Symmetric (``causal=False``): −m_h·|i − j|. Causal: −m_h·(i − j), which equals the
    symmetric form on every key j <= i and is meant for causal attention, where keys j > i are
    masked. (The reference code adds m_h·j per key instead: equal after softmax only under a
    causal mask, and its large values lose precision in bf16 at long lengths.)
    """
    r = relative_positions(q_positions, k_positions).to(torch.float32)  # (.., n, m): j − i
    distance = r if causal else r.abs_().neg_()  # −(i − j) or −|i − j| (r is a fresh tensor)
    if distance.ndim == 2:
        distance = distance[None]  # (1, n, m)
    return slopes.to(device=distance.device, dtype=torch.float32)[:, None, None] * distance[
        :, None
    ]  # (1|b, h, n, m)


def shaw_relative_index(q_positions: Tensor, k_positions: Tensor, max_distance: int) -> Tensor:
    """Shaw et al.'s index clip(j − i, −k, k) + k ∈ [0, 2k], ``(n, m)`` or ``(b, n, m)``."""
    check_positive_int(max_distance, "max_distance")
    r = relative_positions(q_positions, k_positions)
    return r.clamp(-max_distance, max_distance) + max_distance
