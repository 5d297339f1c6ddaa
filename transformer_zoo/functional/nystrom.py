"""Nyström attention: softmax attention through m landmarks, never an n×n matrix.

    Ŝ V = softmax(Q K̃ᵀ/√d) · Z · softmax(Q̃ Kᵀ/√d) · V,    Z ≈ softmax(Q̃ K̃ᵀ/√d)⁺
          └── kernel 1 ──┘       └── kernel 3 ──┘              └── kernel 2 ──┘

Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating
Self-Attention", arXiv 2102.03902, eq. (14)–(16). Su's reading (kexue.fm, 2021-02-16): write
the approximation as softmax(Q K̃ᵀ) · M · softmax(Q̃ Kᵀ) and demand that it equals softmax
attention when the landmarks are all the tokens (Q̃ = Q, K̃ = K); then every factor is the
same matrix S and S M S = S forces M = S⁺, i.e. M = softmax(Q̃ K̃ᵀ)⁺.

Landmarks Q̃, K̃ are segment means: each sample's *valid* tokens (in order) are split into m
contiguous segments of ⌊L/m⌋ or ⌈L/m⌉ tokens (token of rank r goes to segment ⌊r·m/L⌋), so
any length works and padding never enters a landmark. Padded keys are masked out of all three
kernels; the outputs at real positions do not depend on how much padding there is.

Exact vs approximate:
- a sample whose valid key count L ≤ m is computed exactly: each key is its own landmark, and
  Z·softmax(Q̃Kᵀ)·V is replaced by the landmark values themselves (Ŝ = kernel 1 = S). When
  every sample fits, the whole call is ``softmax_attention`` (SDPA).
- otherwise approximate: Z is computed in fp32 (autocast off), by ``pinv_iterations`` steps
  of the iterative pseudoinverse (``functional.iterative_pinv``; the paper's 6 by default) or,
  with ``pinv_iterations=None``, by the ridge-regularised pseudoinverse
  ``functional.regularized_pinv(kernel_2, ridge=pinv_ridge)`` (``DEFAULT_PINV_RIDGE`` = 0.1
  unless given; ``pinv_ridge=0`` is the exact ``torch.linalg.pinv``). Entries of Ŝ can be
  negative and its rows sum to 1 only approximately.

kernel_2 of real queries and keys is badly conditioned (all-MiniLM-L6-v2 at 64 landmarks:
median condition number 2.6e3–2.2e5 per layer, 35–95% of the singular values below 0.1·σ₁;
benchmarks/results/nystrom_conditioning.md), and kernel_1, kernel_3 are not in the spaces its
smallest singular directions would need, so the *exact* pseudoinverse (or many iterations,
which converge to it) amplifies their mismatch: on MiniLM a far worse model than 6 iterations,
in fp64 as in fp32. The truncated iteration (a cut-off near √(‖A‖₁‖A‖∞)/1.8^steps) and the
ridge damp those directions; that is why they work, and why more iterations are not more
accurate (docs/nystrom.md).

The product is evaluated as kernel_1 @ (Z @ (kernel_3 @ V)): the same matrix as
(kernel_1 @ Z) @ (kernel_3 @ V) in O(n·m·d + m²·d) instead of O(n·m² + n·m·d).

Shapes: b batch, h heads (k/v may have h_kv dividing h), n query length, n_k key length,
m landmarks, d head dim. q ``(b, h, n, d)``, k ``(b, h_kv, n_k, d)``, v ``(b, h_kv, n_k, d_v)``
-> ``(b, h, n, d_v)``; factors ``(b, h, n, m)``, ``(b, h, m, m)``, ``(b, h, m, n_k)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from transformer_zoo._checks import check_key_padding_mask, check_positive_int, check_probability
from transformer_zoo.functional.masks import padding_to_attn_mask
from transformer_zoo.functional.pinv import (
    check_pinv_iterations,
    check_pinv_ridge,
    iterative_pinv,
    regularized_pinv,
)
from transformer_zoo.functional.softmax import check_qkv, expand_kv_heads, softmax_attention

#: Ridge of the direct pseudoinverse (``pinv_iterations=None``) unless ``pinv_ridge`` is given:
#: λ = 0.1 · σ₁(kernel_2), chosen on all-MiniLM-L6-v2 at 64 landmarks (benchmarks/
#: interop_zero_shot.py, selection passages; docs/nystrom.md has the sweep).
DEFAULT_PINV_RIDGE = 0.1


def check_pinv_options(pinv_iterations: object, pinv_ridge: object) -> tuple[int | None,
                                                                              float | None]:
    """Validate the pair: ``pinv_ridge`` regularises only the direct (non-iterative) pinv."""
    iterations = check_pinv_iterations(pinv_iterations)
    ridge = check_pinv_ridge(pinv_ridge)
    if iterations is not None and ridge is not None:
        raise ValueError(
            f"pinv_ridge={ridge} regularises the direct pseudoinverse, which pinv_iterations="
            f"None selects; got pinv_iterations={iterations} (the iteration is regularised by "
            f"its number of steps). Pass pinv_iterations=None with pinv_ridge, or drop pinv_ridge"
        )
    return iterations, ridge


def nystrom_pinv(kernel_2: Tensor, pinv_iterations: int | None, pinv_ridge: float | None
                 ) -> Tensor:
    """Z ≈ kernel_2⁺: iterative (int steps) or ridge-regularised (``pinv_iterations=None``).

    The iteration's 4 (m × m) products per step are recomputed in backward instead of saved
    (activation checkpointing: the same ops again, so the same gradient): at m = 256, 8 heads
    and 6 steps they are 48 MiB per layer, whatever n (issue 16's peak memory)."""
    if pinv_iterations is not None:
        if torch.is_grad_enabled() and kernel_2.requires_grad:
            return torch.utils.checkpoint.checkpoint(iterative_pinv, kernel_2, pinv_iterations,
                                                     use_reentrant=False)
        return iterative_pinv(kernel_2, pinv_iterations)
    ridge = DEFAULT_PINV_RIDGE if pinv_ridge is None else pinv_ridge
    return regularized_pinv(kernel_2, ridge=ridge)


class NystromFactors(NamedTuple):
    """The three factors of Ŝ = kernel_1 · z · kernel_3 (z in fp32 or wider)."""

    kernel_1: Tensor  # (b, h, n, m)    softmax(Q K̃ᵀ/√d) over live landmarks
    z: Tensor  # (b, h, m, m)           ≈ softmax(Q̃ K̃ᵀ/√d)⁺
    kernel_3: Tensor  # (b, h, m, n_k)  softmax(Q̃ Kᵀ/√d) over real keys

    def attention_matrix(self) -> Tensor:
        """Ŝ ``(b, h, n, n_k)``: O(n·n_k) memory, for analysis only."""
        z = self.z.to(self.kernel_1.dtype)
        return self.kernel_1 @ z @ self.kernel_3.to(self.kernel_1.dtype)


def segment_ids(valid: Tensor | None, batch: int, n: int, m: int, device: torch.device
                ) -> tuple[Tensor, Tensor]:
    """Segment of every token: ``(ids (b, n) int64 in [0, m], counts (b, m) int64)``.

    The token of rank r among the L valid tokens of its sample goes to segment ⌊r·m/L⌋;
    padded tokens go to the discard slot m. Segments hold ⌊L/m⌋ or ⌈L/m⌉ tokens when L >= m,
    and one token or none when L < m.
    """
    if valid is None:
        ids = (torch.arange(n, device=device) * m // n).expand(batch, n)  # (b, n)
    else:
        length = valid.sum(dim=-1, keepdim=True).clamp_min(1)  # (b, 1)
        rank = valid.cumsum(dim=-1) - 1  # (b, n)
        ids = torch.where(valid, rank * m // length, m)
    counts = torch.zeros(batch, m + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    return ids, counts[:, :m]


def segment_means(x: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
    """Per-sample segment means ``(b, h, m, d)`` of x ``(b, h, n, d)``; empty segments give 0."""
    b, h, n, d = x.shape
    m = counts.shape[-1]
    # eager shortcut (no padding, equal segments); traced code (compile/export) takes the
    # general path, which gives the same means without a branch on values or on n % m
    if (not torch.compiler.is_compiling() and m <= n and n % m == 0
            and bool((counts == n // m).all())):
        return x.view(b, h, m, n // m, d).mean(dim=-2)
    index = ids[:, None, :, None].expand(b, h, n, d)
    sums = x.new_zeros(b, h, m + 1, d).scatter_add(2, index, x)[:, :, :m]  # (b, h, m, d)
    return sums / counts.clamp_min(1)[:, None, :, None].to(x.dtype)


def _masked_softmax(logits: Tensor, valid: Tensor | None) -> Tensor:
    """Softmax over the last dim restricted to ``valid`` (a finite fill keeps empty rows finite)."""
    if valid is None:
        return logits.softmax(dim=-1)
    return logits.masked_fill(~valid, torch.finfo(logits.dtype).min).softmax(dim=-1)


def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_landmarks: int,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    pinv_iterations: int | None = 6,
    pinv_ridge: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_factors: bool = False,
) -> Tensor | tuple[Tensor, NystromFactors]:
    """Nyström approximation of softmax attention; see the module docstring.

    Args:
        q, k, v: ``(b, h, n, d)``, ``(b, h_kv, n_k, d)``, ``(b, h_kv, n_k, d_v)``.
        num_landmarks: m, the number of segment-mean landmarks per sample.
        key_padding_mask: ``(b, n_k)`` True = real key; padded keys take part in nothing.
        query_padding_mask: ``(b, n)`` True = real query; only real queries form Q̃ (pass the
            key mask here for self-attention). Padded queries still get an output row.
        pinv_iterations: steps of the iterative pseudoinverse (6, the paper's, is the
            default; more steps converge to the exact pinv and degrade real models: 12 steps
            give mean cosine 0.71 instead of 0.91 zero-shot on MiniLM), or None for the direct,
            ridge-regularised pseudoinverse (``regularized_pinv``).
        pinv_ridge: with ``pinv_iterations=None``, λ / σ₁(kernel_2); default
            ``DEFAULT_PINV_RIDGE`` = 0.1, the best measured on MiniLM. ``0`` gives the exact
            ``torch.linalg.pinv``, exact in the limit Q̃ = Q, K̃ = K but far worse on real
            inputs (MiniLM: mean cosine 0.14–0.16); see docs/nystrom.md. An int
            ``pinv_iterations`` with a ``pinv_ridge`` raises ValueError.
        scale: logit scale, default 1/√d.
        dropout_p: dropout on kernel 1's weights (on the attention weights on the exact path).
        return_factors: also return ``NystromFactors`` (kernel_1, z, kernel_3); for samples
            computed exactly z is the identity on live landmarks and kernel_3 the segment
            averaging matrix, so kernel_1 · z · kernel_3 is Ŝ for every sample.

    Returns:
        ``(b, h, n, d_v)``, or ``(out, factors)``. Samples without real keys give 0.
    """
    b, h, n, n_k, _ = check_qkv(q, k, v)
    m = check_positive_int(num_landmarks, "num_landmarks")
    check_probability(dropout_p, "dropout_p")
    pinv_iterations, pinv_ridge = check_pinv_options(pinv_iterations, pinv_ridge)
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, b, n_k, "key_padding_mask")
    if query_padding_mask is not None:
        check_key_padding_mask(query_padding_mask, b, n, "query_padding_mask")
    k, v = expand_kv_heads(k, v, h)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    key_len = (torch.full((b,), n_k, device=q.device) if key_padding_mask is None
               else key_padding_mask.sum(dim=-1))  # (b,)
    # Under torch.compile the data-dependent shortcuts below are not taken (they would break
    # the graph); the general path handles exact samples and empty landmarks by masking.
    compiling = torch.compiler.is_compiling()
    if not return_factors and (n_k <= m or (not compiling and int(key_len.max()) <= m)):
        mask = None if key_padding_mask is None else padding_to_attn_mask(key_padding_mask)
        return softmax_attention(q, k, v, mask=mask, dropout_p=dropout_p, scale=scale)

    # The approximate path runs in fp32 (at least): Z ≈ kernel_2⁺ can have large entries and
    # amplifies the rounding of bf16/fp16 factors (measured 0.29·max|v| error in bf16 at
    # |q| = |k| = 10, d = 8, against 3e-3 with fp32 factors).
    out_dtype = q.dtype
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(work), k.to(work), v.to(work)
    q_ids, q_counts = segment_ids(query_padding_mask, b, n, m, q.device)
    k_ids, k_counts = segment_ids(key_padding_mask, b, n_k, m, q.device)
    q_live, k_live = q_counts > 0, k_counts > 0  # (b, m) landmarks that hold a token
    q_lm = segment_means(q, q_ids, q_counts)  # (b, h, m, d)  Q̃
    k_lm = segment_means(k, k_ids, k_counts)  # (b, h, m, d)  K̃
    k_live_cols = None if not compiling and bool(k_live.all()) else k_live[:, None, None, :]
    keys = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    q_live_rows = None if not compiling and bool(q_live.all()) else q_live[:, None, :, None]

    with torch.autocast(q.device.type, enabled=False):
        work = torch.promote_types(q.dtype, torch.float32)
        logits_2 = q_lm.to(work) @ k_lm.to(work).transpose(-2, -1) * scale  # (b, h, m, m)
        kernel_2 = _masked_softmax(logits_2, k_live_cols)
        if q_live_rows is not None:
            kernel_2 = kernel_2 * q_live_rows  # empty query landmarks: zero rows
        z = nystrom_pinv(kernel_2, pinv_iterations, pinv_ridge)  # (b, h, m, m)

    exact = key_len <= m  # (b,) samples whose keys are their own landmarks
    any_exact = compiling or bool(exact.any())
    with torch.autocast(q.device.type, enabled=False):
        if return_factors:
            kernel_3 = _masked_softmax(q_lm * scale @ k.transpose(-2, -1), keys)  # (b,h,m,n_k)
            kv = kernel_3 @ v
        else:  # kernel 3 times V, fused (SDPA never stores the (m, n_k) weights)
            kv = softmax_attention(q_lm, k, v, mask=keys, scale=scale)  # (b, h, m, d_v)
    with torch.autocast(q.device.type, enabled=False):
        middle = (z @ kv.to(z.dtype)).to(kv.dtype)  # (b, h, m, d_v)
    if any_exact:
        v_lm = segment_means(v, k_ids, k_counts)  # (b, h, m, d_v) the keys' own values
        middle = torch.where(exact[:, None, None, None], v_lm.to(middle.dtype), middle)
    # kernel 1 times the middle factor, fused; empty landmarks masked, keyless samples give 0
    with torch.autocast(q.device.type, enabled=False):
        out = softmax_attention(q, k_lm, middle, mask=k_live_cols, scale=scale,
                                dropout_p=dropout_p).to(out_dtype)
    if not return_factors:
        return out
    kernel_1 = _masked_softmax(q * scale @ k_lm.transpose(-2, -1), k_live_cols)  # (b, h, n, m)
    kernel_1 = kernel_1 * k_live.any(dim=-1)[:, None, None, None].to(kernel_1.dtype)
    if q_live_rows is not None:
        kernel_3 = kernel_3 * q_live_rows
    if any_exact:
        sel = exact[:, None, None, None]
        eye = torch.diag_embed(k_live.to(z.dtype))[:, None]  # (b, 1, m, m)
        onehot = F.one_hot(k_ids, m + 1)[..., :m].transpose(-2, -1)  # (b, m, n_k)
        average = onehot.to(kernel_3.dtype) / k_counts.clamp_min(1)[..., None].to(kernel_3.dtype)
        z = torch.where(sel, eye, z)
        kernel_3 = torch.where(sel, average[:, None], kernel_3)
    return out, NystromFactors(kernel_1, z, kernel_3)
