"""Nyström attention contenders: ours and nystrom-attention's module, same configuration.

Both are whole self-attention modules (projections in, output projection out) with 256
landmarks, 6 pseudoinverse iterations and a depthwise residual convolution of length 33, as
in the paper's long-sequence setting (d_model 512, 8 heads of 64).

``errors(n)``: relative error of the attention output against exact softmax attention on the
same q, k, v (``common.error_inputs``), at equal landmarks, ours vs nystrom-attention's
kernel (no convolution: it is not part of the approximation). ``landmark_sweep`` gives the
curve that ``benchmarks/nystrom_errors.py`` plots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.common import (
    BATCH,
    CPU,
    D_MODEL,
    HEAD_DIM,
    HEADS,
    ContenderFactory,
    Step,
    error_inputs,
    randn,
    relative_error,
)
from transformer_zoo import NystromAttention
from transformer_zoo.functional import explicit_softmax_attention, nystrom_attention

LANDMARKS, ITERATIONS, CONV = 256, 6, 33

try:
    from nystrom_attention import NystromAttention as PeerNystrom
except ImportError:  # pragma: no cover - peer not installed
    PeerNystrom = None

try:
    from transformers import NystromformerConfig
    from transformers.models.nystromformer.modeling_nystromformer import (
        NystromformerSelfAttention,
    )
except ImportError:  # pragma: no cover - the hf extra not installed
    NystromformerSelfAttention = None


def nystrom_module(n: int, device: torch.device = CPU) -> Step:
    attn = NystromAttention(D_MODEL, HEADS, num_landmarks=LANDMARKS,
                            pinv_iterations=ITERATIONS, conv_kernel=CONV).to(device)
    x = randn(BATCH, n, D_MODEL, device=device, requires_grad=True)
    return lambda: attn(x)


def peer_nystrom_module(n: int, device: torch.device = CPU) -> Step:
    attn = PeerNystrom(dim=D_MODEL, dim_head=HEAD_DIM, heads=HEADS, num_landmarks=LANDMARKS,
                       pinv_iterations=ITERATIONS, residual_conv_kernel=CONV).to(device)
    x = randn(BATCH, n, D_MODEL, device=device, requires_grad=True)
    return lambda: attn(x)


def hf_nystromformer_module(n: int, device: torch.device = CPU) -> Step:
    """HF's self-attention (6 iterations, fixed in its code) plus an output projection like
    ours; its ``segment_means_seq_len`` must equal n (its own limitation), so set per length,
    and it cannot take more landmarks than tokens (the memory probe's n = 64 warm-up)."""
    config = NystromformerConfig(
        hidden_size=D_MODEL, num_attention_heads=HEADS, num_landmarks=min(LANDMARKS, n),
        segment_means_seq_len=n, conv_kernel_size=CONV, attention_probs_dropout_prob=0.0,
    )
    attn = NystromformerSelfAttention(config).to(device)
    out_proj = torch.nn.Linear(D_MODEL, D_MODEL).to(device)
    x = randn(BATCH, n, D_MODEL, device=device, requires_grad=True)
    return lambda: out_proj(attn(x)[0])


def contenders() -> dict[str, ContenderFactory]:
    found: dict[str, ContenderFactory] = {"NystromAttention": nystrom_module}
    if PeerNystrom is not None:
        found["nystrom-attention"] = peer_nystrom_module
    if NystromformerSelfAttention is not None:
        found["Nystromformer (HF transformers)"] = hf_nystromformer_module
    return found


def peer_kernel(q: Tensor, k: Tensor, v: Tensor, m: int, iterations: int) -> Tensor:
    """nystrom-attention's forward on given q, k, v: its identity projections, no conv."""
    b, h, n, d = q.shape
    peer = PeerNystrom(dim=h * d, dim_head=d, heads=h, num_landmarks=m,
                       pinv_iterations=iterations, residual=False).to(q.device, q.dtype)
    eye = torch.eye(h * d, device=q.device)
    with torch.no_grad():
        # to_qkv maps x = [q | k | v] (b, n, 3·h·d) to q, k, v (it scales q by 1/√d itself)
        peer.to_qkv = torch.nn.Linear(3 * h * d, 3 * h * d, bias=False).to(q.device, q.dtype)
        peer.to_qkv.weight.copy_(torch.eye(3 * h * d, device=q.device))
        peer.to_out[0].weight.copy_(eye)
        peer.to_out[0].bias.zero_()
        flat = [t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v)]
        out = peer(torch.cat(flat, dim=-1))  # (b, n, h·d)
    return out.reshape(b, n, h, d).transpose(1, 2)


def landmark_sweep(n: int, landmarks: list[int], iterations: int = ITERATIONS, *,
                   device: torch.device = CPU, dtype: torch.dtype = torch.float32
                   ) -> dict[str, list[float]]:
    """Relative error vs exact softmax for each landmark count: ours, ours with twice the
    iterations, ours with an exact pinv, ours with the ridge pinv (``pinv_iterations=None``,
    default ridge) and nystrom-attention (when installed; NaN where it fails, as on bf16
    inputs). On ``device``; the approximations get q, k, v in ``dtype``, the reference is fp64
    on the fp32 inputs."""
    q32, k32, v32 = error_inputs(n, device=device)
    exact, _ = explicit_softmax_attention(q32.double(), k32.double(), v32.double())
    q, k, v = (t.to(dtype) for t in (q32, k32, v32))
    more = f"ours ({2 * iterations} iterations)"
    ridge = "ours (ridge pinv, pinv_iterations=None)"
    curves: dict[str, list[float]] = {"ours": [], more: [], "ours (exact pinv)": [], ridge: []}
    if PeerNystrom is not None:
        curves["nystrom-attention"] = []
    for m in landmarks:
        with torch.no_grad():
            curves["ours"].append(relative_error(
                nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=iterations), exact))
            curves[more].append(relative_error(
                nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=2 * iterations),
                exact))
            curves["ours (exact pinv)"].append(relative_error(
                nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=None, pinv_ridge=0.0),
                exact))
            curves[ridge].append(relative_error(
                nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=None), exact))
        if PeerNystrom is not None:
            try:
                peer_error = relative_error(peer_kernel(q, k, v, m, iterations), exact)
            except RuntimeError:  # its pseudoinverse mixes dtypes: fails on bf16 / fp16 inputs
                peer_error = float("nan")
            curves["nystrom-attention"].append(peer_error)
    return curves


def errors(n: int, device: torch.device = CPU, dtype: torch.dtype = torch.float32
           ) -> dict[str, float]:
    """Relative error at 64 and 256 landmarks (capped at n), ours vs nystrom-attention."""
    table: dict[str, float] = {}
    for m in sorted({min(64, n), min(LANDMARKS, n)}):
        for name, curve in landmark_sweep(n, [m], device=device, dtype=dtype).items():
            table[f"{name}, m={m}"] = curve[0]
    return table

