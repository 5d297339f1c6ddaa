"""Transformer-XL relative attention kernels: the sinusoid R, the distinct distances, the bias.

    A^rel_ij = q_iᵀk_j            (a) content          (computed by the attention kernel)
             + q_iᵀ W_R R_{i−j}    (b) content–position
             + uᵀ k_j              (c) global content bias
             + vᵀ W_R R_{i−j}      (d) global position bias,   all · 1/√d

Dai, Yang, Yang, Carbonell, Le, Salakhutdinov 2019, "Transformer-XL: Attentive Language
Models Beyond a Fixed-Length Context", arXiv 1901.02860, section 3.3. Here q_i = W_q E_xi and
k_j = W_{k,E} E_xj are the projected (per-head) queries and keys, W_R = W_{k,R} maps the
d_model-wide sinusoid R to every head (the reference code's ``r_net``, no bias), u, v are the
reference code's ``r_w_bias`` and ``r_r_bias``.

Terms (b) + (d) are (q_i + v)ᵀ W_R R_r: computed once per distinct distance r, then gathered
per (i, j) — an ``(b, h, n, T)`` score table with T ≤ n + m − 1 distances for positions that
step by one (offsets, left padding, packed sequences, memory), never an ``(n, m, d)`` tensor.
Exact (the paper's formula to floating-point rounding).

Shapes: b batch, h heads, n query length, m key length, d head dim, D the sinusoid width
(d_model in the paper), T the number of distances. q ``(b, h, n, d)``, k ``(b, h, m, d)``;
positions int64 ``(n,)``/``(b, n)`` and ``(m,)``/``(b, m)``; bias ``(b, h, n, m)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_zoo._checks import check_positive_int, check_rank, check_tensor
from transformer_zoo.functional.relative import relative_positions


def transformer_xl_sinusoid(
    distances: Tensor, width: int, *, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """R_r = [sin(r·ω_0) … sin(r·ω_{D/2−1}), cos(r·ω_0) … cos(r·ω_{D/2−1})], ω_k =
    base^(−2k/D): int64 ``(...,)`` -> ``(..., D)`` in ``dtype``.

    The reference code's layout (``PositionalEmbedding``: all sines, then all cosines), so its
    ``r_net`` weights copy over unchanged. Angles are formed in fp64 (fp32 on MPS), then
    rounded to ``dtype``. Negative distances (keys after the query) are the same formula.
    """
    check_tensor(distances, "distances")
    if distances.dtype != torch.int64:
        raise TypeError(f"distances: expected int64, got dtype {distances.dtype}")
    check_positive_int(width, "width")
    if width % 2:
        raise ValueError(f"width: the sinusoid needs an even size, got {width}")
    wide = torch.float32 if distances.device.type == "mps" else torch.float64
    exponent = torch.arange(0, width, 2, device=distances.device, dtype=wide)
    inv_freq = base ** (-exponent / width)  # (D/2,)
    angles = distances.to(wide)[..., None] * inv_freq  # (..., D/2)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(dtype)  # (..., D)


def relative_distance_table(
    q_positions: Tensor, k_positions: Tensor, *, clamp_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """The distinct distances i − j (query position minus key position) and, per (i, j), the
    index of its distance: ``distances`` int64 ``(1|b, T)``, ``index`` int64 ``(1|b, n, m)``
    with ``distances[β, index[β, i, j]] = clip(pos_i − pos_j, −clamp_len, clamp_len)``.

    The table is the window of T = n + m − 1 distances (2·clamp_len + 1 if smaller) that
    starts at each sample's smallest distance: it holds every distance when each position
    set spans at most its own length (max − min < n for queries and < m for keys: any offset,
    left padding, packed sequences, keys of a memory before the queries). Otherwise
    (positions with gaps) the eager path falls back to the sorted distinct distances
    (``torch.unique``); under ``torch.compile`` such positions raise (a runtime assert), as
    the table's size must not depend on the data.
    """
    r = -relative_positions(q_positions, k_positions)  # (.., n, m): i − j
    if clamp_len is not None:
        clamp_len = check_positive_int(clamp_len, "clamp_len")
        r = r.clamp(-clamp_len, clamp_len)
    r = r[None] if r.ndim == 2 else r  # (1|b, n, m)
    n, m = r.shape[-2:]
    if n == 0 or m == 0:  # no pairs: an empty table
        return r.new_zeros(r.shape[0], 0), r
    size = n + m - 1 if clamp_len is None else min(n + m - 1, 2 * clamp_len + 1)
    lo = r.flatten(1).amin(dim=-1)  # (1|b,): each sample's smallest distance
    index = r - lo[:, None, None]
    if torch.compiler.is_compiling():
        torch._assert_async(
            index.max() < size,
            "Transformer-XL distances: positions with gaps are not supported under "
            "torch.compile (each position set may span at most its length)",
        )
    elif int(index.max()) >= size:  # gaps: the distinct distances, whatever their number
        distances, inverse = torch.unique(r, sorted=True, return_inverse=True)
        return distances[None], inverse
    distances = lo[:, None] + torch.arange(size, device=r.device)  # (1|b, T)
    return distances, index


def _check_inputs(q: Tensor, k: Tensor, u: Tensor, v: Tensor, r_weight: Tensor) -> None:
    check_rank(q, "q", 4, "(batch, heads, q_len, head_dim)")
    check_rank(k, "k", 4, "(batch, heads, k_len, head_dim)")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(
            f"k: expected (batch={b}, heads={h}, k_len, head_dim={d}) like q, got shape "
            f"{tuple(k.shape)}"
        )
    for name, t in (("u", u), ("v", v)):
        check_tensor(t, name)
        if tuple(t.shape) != (h, d):
            raise ValueError(f"{name}: expected shape (heads={h}, head_dim={d}), got "
                             f"{tuple(t.shape)}")
    check_tensor(r_weight, "r_weight")
    if r_weight.ndim != 2 or r_weight.shape[0] != h * d:
        raise ValueError(
            f"r_weight: expected shape (heads·head_dim={h * d}, sinusoid width), got "
            f"{tuple(r_weight.shape)}"
        )


def transformer_xl_bias(
    q: Tensor,
    k: Tensor,
    *,
    u: Tensor,
    v: Tensor,
    r_weight: Tensor,
    q_positions: Tensor,
    k_positions: Tensor,
    clamp_len: int | None = None,
    base: float = 10000.0,
    scale: float | None = None,
) -> Tensor:
    """Terms (b) + (c) + (d) of Transformer-XL's logit, times ``scale`` (default 1/√d):
    [(q_i + v)ᵀ W_R R_{i−j} + uᵀ k_j] · scale, ``(b, h, n, m)``, to add to q_iᵀk_j · scale.

    Args:
        q: ``(b, h, n, d)`` projected queries (W_q E_x).
        k: ``(b, h, m, d)`` projected content keys (W_{k,E} E_x), for term (c).
        u, v: ``(h, d)`` global content and position biases.
        r_weight: ``(h·d, D)`` W_{k,R}, as an ``nn.Linear(D, h·d, bias=False)`` weight.
        q_positions, k_positions: int64 ``(n,)``/``(b, n)`` and ``(m,)``/``(b, m)``.
        clamp_len: clip distances to [−clamp_len, clamp_len] (the reference code's
            ``clamp_len``); None: no clipping.
        base: the sinusoid's 10000.
    """
    _check_inputs(q, k, u, v, r_weight)
    b, h, n, d = q.shape
    m = k.shape[2]
    if k_positions.shape[-1] != m or q_positions.shape[-1] != n:
        raise ValueError(
            f"positions: expected q_positions (…, {n}) and k_positions (…, {m}), got "
            f"{tuple(q_positions.shape)} and {tuple(k_positions.shape)}"
        )
    scale = d ** -0.5 if scale is None else float(scale)
    distances, index = relative_distance_table(q_positions, k_positions, clamp_len=clamp_len)
    rel = transformer_xl_sinusoid(distances, r_weight.shape[1], base=base,
                                  dtype=r_weight.dtype)  # (1|b, T, D): R_r
    w_r = F.linear(rel, r_weight).unflatten(-1, (h, d)).transpose(1, 2)  # (1|b, h, T, d)
    qv = (q + v.to(q.dtype)[:, None]) * scale  # (b, h, n, d): (q_i + v)/√d
    per_distance = qv @ w_r.to(q.dtype).transpose(-1, -2)  # (b, h, n, T): terms (b) + (d)
    bias = per_distance.gather(-1, index[:, None].expand(b, h, n, m))  # (b, h, n, m)
    content = k @ (u.to(k.dtype) * scale)[:, :, None]  # (b, h, m, 1): uᵀk_j/√d, term (c)
    return bias + content.transpose(-1, -2)


def row_positions(q_positions: Tensor, k_positions: Tensor, clamp_len: int | None
                  ) -> tuple[Tensor, Tensor, int | None]:
    """The row builders' shared checks: positions' dtype and rank (``relative_positions``),
    ``clamp_len``; returns the positions as ``(1|b, n)``, ``(1|b, m)`` and ``clamp_len``."""
    relative_positions(q_positions[..., :1], k_positions[..., :1])  # dtype/rank checks
    if clamp_len is not None:
        clamp_len = check_positive_int(clamp_len, "clamp_len")
    qp = q_positions if q_positions.ndim == 2 else q_positions[None]  # (1|b, n)
    kp = k_positions if k_positions.ndim == 2 else k_positions[None]  # (1|b, m)
    return qp, kp, clamp_len


def transformer_xl_bias_rows(
    q: Tensor,
    k: Tensor,
    *,
    u: Tensor,
    v: Tensor,
    r_weight: Tensor,
    q_positions: Tensor,
    k_positions: Tensor,
    clamp_len: int | None = None,
    base: float = 10000.0,
    scale: float | None = None,
) -> Callable[[int, int], Tensor] | None:
    """``transformer_xl_bias`` one block of query rows at a time, with the per-call work done
    once: returns ``rows(i0, i1)`` -> rows i0:i1 of the bias ``(b, h, i1 − i0, m)`` (equal to
    them to rounding), or None for positions with gaps (then call ``transformer_xl_bias`` per
    block). The W_R R table of the call's n + m − 1 distances (lo = min pos_q − max pos_k per
    sample) and uᵀk_j are computed once; each block costs one ``(b, h, rows, W)`` matmul over
    the window of W <= rows + m − 1 distances its rows use (contiguous positions; the whole
    table under ``torch.compile``) and a gather."""
    _check_inputs(q, k, u, v, r_weight)
    b, h, n, d = q.shape
    m = k.shape[2]
    if n == 0 or m == 0:
        return None
    qp, kp, clamp_len = row_positions(q_positions, k_positions, clamp_len)
    lo, hi = qp.amin(-1) - kp.amax(-1), qp.amax(-1) - kp.amin(-1)  # (1|b,) and (1|b,)
    size = n + m - 1
    if clamp_len is not None:
        lo, hi = lo.clamp(-clamp_len, clamp_len), hi.clamp(-clamp_len, clamp_len)
        size = min(size, 2 * clamp_len + 1)
    if torch.compiler.is_compiling():
        torch._assert_async(
            (hi - lo).max() < size,
            "Transformer-XL distances: positions with gaps are not supported under "
            "torch.compile (each position set may span at most its length)",
        )
    elif int((hi - lo).max()) >= size:
        return None
    scale = d ** -0.5 if scale is None else float(scale)
    distances = lo[:, None] + torch.arange(size, device=q.device)  # (1|b, T)
    rel = transformer_xl_sinusoid(distances, r_weight.shape[1], base=base,
                                  dtype=r_weight.dtype)  # (1|b, T, D)
    w_r = F.linear(rel, r_weight).unflatten(-1, (h, d)).transpose(1, 2).to(q.dtype)
    content = (k @ (u.to(k.dtype) * scale)[:, :, None]).transpose(-1, -2)  # (b, h, 1, m)
    v_scaled = v.to(q.dtype)[:, None]

    def rows(i0: int, i1: int) -> Tensor:
        r = qp[:, i0:i1, None] - kp[:, None, :]  # (1|b, rows, m): i − j
        if clamp_len is not None:
            r = r.clamp(-clamp_len, clamp_len)
        index = r - lo[:, None, None]
        table = w_r
        if not torch.compiler.is_compiling():  # only the block's window of distances
            first, last = int(index.min()), int(index.max())  # ~rows + m of the n + m
            table, index = w_r[..., first:last + 1, :], index - first
        qv = (q[:, :, i0:i1] + v_scaled) * scale
        per_distance = qv @ table.transpose(-1, -2)  # (b, h, rows, window)
        return per_distance.gather(-1, index[:, None].expand(b, h, i1 - i0, m)) + content

    return rows
