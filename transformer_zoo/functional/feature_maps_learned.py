"""Learnable feature maps φ for linear attention: the formulas, as plain functions.

Per head h, on the head's query or key x (Hedgehog and T2R, as in their papers' code) or on
FAVOR+'s x̂ = d^(−1/4) x (learned-W FAVOR+):

- Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine", arXiv 2402.04347):
      z = x W_h + b_h,   φ(x) = [softmax(z), softmax(−z)]          (over the d_f features)
  returned as log-features [log_softmax(z), log_softmax(−z)] (F = 2·d_f), so the kernel's
  stabilisers keep it exact where the softmax itself would underflow (large norms).
- T2R (Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs", arXiv 2103.13076):
      φ(x) = ReLU(W_h x + b_h)                                           (F features)
  plain (non-exponential) features.
- Learned-W FAVOR+ (Choromanski et al. 2021, arXiv 2009.14794, positive features with W
  trained): log φ(x̂) = W_h x̂ − |x̂|²/2 (query side without −|x̂|²/2, which cancels exactly).

None of these is an estimate of softmax attention until trained (learned-W FAVOR+ at its
random initial W is FAVOR+'s unbiased estimate); the kernel computes each one exactly.
Shapes: x ``(b, h, n, d)``; Hedgehog W ``(h, d, d_f)``, b ``(h, d_f)``; T2R W ``(h, F, d)``,
b ``(h, F)``; learned-W FAVOR+ W ``(h, r, d)``; output ``(b, h, n, F)``. Parameters are cast
to x's dtype (the kernel forms features in fp32 under autocast; gradients reach the
parameters through the cast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hedgehog_log_features(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """log φ(x) = [log_softmax(xW + b), log_softmax(−(xW + b))]: ``(b, h, n, 2·d_f)``.

    x ``(b, h, n, d)``, W ``(h, d, d_f)``, b ``(h, d_f)`` or None.
    """
    z = torch.matmul(x, weight.to(x.dtype))  # (b, h, n, d_f)
    if bias is not None:
        z = z + bias.to(x.dtype)[:, None, :]
    return torch.cat([F.log_softmax(z, dim=-1), F.log_softmax(-z, dim=-1)], dim=-1)


def t2r_features(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """φ(x) = ReLU(W x + b): ``(b, h, n, F)``; x ``(b, h, n, d)``, W ``(h, F, d)``, b ``(h, F)``."""
    z = torch.matmul(x, weight.to(x.dtype).transpose(-2, -1))  # (b, h, n, F)
    if bias is not None:
        z = z + bias.to(x.dtype)[:, None, :]
    return torch.relu(z)


def learned_positive_log_features(x_hat: Tensor, weight: Tensor, *, query: bool) -> Tensor:
    """log φ(x̂) = W x̂ − |x̂|²/2 per head (query: W x̂): ``(b, h, n, r)``; W ``(h, r, d)``."""
    proj = torch.matmul(x_hat, weight.to(x_hat.dtype).transpose(-2, -1))  # (b, h, n, r)
    return proj if query else proj - x_hat.square().sum(-1, keepdim=True) * 0.5
