"""The hybrid window attention in blocks of w rows: dense matmuls only.

``bidirectional_hybrid`` is the whole bidirectional kernel; ``causal_window_part`` the causal
kernel's window part (block A's queries against blocks A − 1 and A; its linear part is the
prefix sum in ``hybrid_window.py``).

With windows |i − j| < w and the sequence cut in blocks of w rows, block A's queries see

- block A: every key inside the window;
- blocks A − 1 and A + 1: keys partly inside (|i − j| < w), partly outside: both the softmax
  term and the linear term φ(q)ᵀφ(k) are formed for these w × w pairs and masked;
- blocks ≤ A − 2 and ≥ A + 2: every key outside, through per-block states
  S_B = φ(K_B)ᵀ[V_B, 1] ``(F, d + 1)``, summed by a prefix and a suffix cumsum over blocks
  (no "total minus window" subtraction).

The formula is ``hybrid_window.py``'s (LoLCATs, Zhang et al. 2024, arXiv 2410.10254):
y_i = [γ Σ_W e^{s_ij − c_i} v_j + λ Σ_L φ(q_i)ᵀφ(k_j) v_j] / [same without v], c_i the max of
the window's scores. Exponential maps: φ(k) = e^{log φ(k) − c_f} (c_f the max of feature f
over real keys), φ(q) = e^{log φ(q) + c_f − t_i}, t_i their max over features; the linear
terms are then scaled back by e^{t_i − u_i} and the softmax terms by e^{−u_i}, u_i =
max(0, t_i) (every factor <= 1; exact, the stabilisers are constants that cancel).
Cost: O(n·(3w·d + 2w·F + F·d)) time, O(n·w) memory per head. Shapes as ``hybrid_window``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _blocks(x: Tensor, c: int, nb: int, value: float = 0.0) -> Tensor:
    """``(..., n, f)`` -> ``(..., nb, c, f)``, padded at the end with ``value`` (always padded,
    by 0 rows if need be: no branch on the length, so compile and export stay dynamic)."""
    x = F.pad(x, (0, 0, 0, nb * c - x.shape[-2]), value=value)
    return x.reshape(*x.shape[:-2], nb, c, x.shape[-1])


def _neighbour(xb: Tensor, o: int, value: float = 0.0) -> Tensor:
    """Block A of the result is block A + o of ``xb`` ``(..., nb, c, f)`` (``value`` beyond);
    pad, then slice: nb blocks for any nb."""
    nb = xb.shape[-3]
    if o == 0:
        return xb
    if o < 0:
        return F.pad(xb, (0, 0, 0, 0, -o, 0), value=value)[..., :nb, :, :]
    return F.pad(xb, (0, 0, 0, 0, 0, o), value=value)[..., o:, :, :]


def _window_scores(q: Tensor, k: Tensor, valid: Tensor | None, c: int,
                   inside: dict[int, Tensor]):
    """Per neighbour offset o: the scores of block A's queries against block A + o's keys
    ``(b, h, nb, c, c)``, the window mask (``inside[o]`` and real keys), and c_i, the max over
    the window's scores (found without gradient, then recomputed from q and the winning key,
    so gradients reach it exactly; 0 for a row without keys in its window)."""
    b, h, n, d = q.shape
    nb = -(-n // c)
    live = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
    liveb = F.pad(live, (0, nb * c - n), value=False).view(b, 1, nb, 1, c)
    qb, kb = _blocks(q * d ** -0.5, c, nb), _blocks(k, c, nb)
    scores, oks, live_o = {}, {}, {}
    best = best_at = None
    for o in inside:
        live_o[o] = _neighbour(liveb, o, False)
        oks[o] = inside[o] & live_o[o]  # (b, 1, nb, c, c)
        scores[o] = torch.matmul(qb, _neighbour(kb, o).transpose(-2, -1))  # (b, h, nb, c, c)
        m, at = scores[o].detach().masked_fill(~oks[o], float("-inf")).max(-1, keepdim=True)
        at = at + (o + 1) * c  # index into the blocks A − 1, A, A + 1
        if best is None:
            best, best_at = m, at
        else:
            better = m > best
            best, best_at = torch.where(better, m, best), torch.where(better, at, best_at)
    three = torch.cat([_neighbour(kb, -1), kb, _neighbour(kb, 1)], -2)  # (b, h, nb, 3c, d)
    winner = three.gather(-2, best_at.expand(*best_at.shape[:-1], d))  # (b, h, nb, c, d)
    top = (qb * winner).sum(-1, keepdim=True)
    top = torch.where(torch.isfinite(best), top, 0.0)
    return scores, oks, live_o, top, nb


def _softmax_terms(scores: Tensor, ok: Tensor, top: Tensor) -> Tensor:
    """e^{s − c} on the window's pairs, 0 elsewhere (masked before the exponential)."""
    bias = torch.zeros(ok.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
        ~ok, float("-inf"))
    return (scores + bias).sub_(top).exp_()


def causal_window_part(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None,
                       window: int) -> Tensor:
    """Σ_{i−w<j≤i} e^{s_ij − c_i} [v_j, 1] ``(b, h, n, d + 1)``: blocks of w queries against
    their own block (j <= i) and the previous one (i − j < w)."""
    b, h, n, d = q.shape
    c = min(window, n)  # n < w: one block of n rows (its previous block is padding)
    r = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(c, device=q.device)[None, :]
    scores, oks, _, top, nb = _window_scores(q, k, valid, c, {-1: t > r, 0: t <= r})
    xb = _blocks(torch.cat([v, torch.ones_like(v[..., :1])], -1), c, nb)
    out = 0.0
    for o in scores:
        out = out + torch.matmul(_softmax_terms(scores[o], oks[o], top), _neighbour(xb, o))
    return out.reshape(b, h, nb * c, d + 1)[:, :, :n]


def bidirectional_hybrid(q: Tensor, k: Tensor, v: Tensor, lq: Tensor, lk: Tensor,
                         valid: Tensor | None, gamma: Tensor, lam: Tensor | float,
                         window: int, exponential: bool) -> Tensor:
    """q, k, v ``(b, h, n, d)``; lq, lk ``(b, h, n, F)`` (log-)features, padded keys −inf
    (exponential) or 0; valid ``(b, n)`` or None; gamma ``(h, 1, 1)`` -> ``(b, h, n, d)``."""
    b, h, n, d = q.shape
    c = min(window, n)  # rows per block (n < w: one block of n rows, no neighbours)
    r = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(c, device=q.device)[None, :]
    inside = {-1: t > r, 0: torch.ones(c, c, dtype=torch.bool, device=q.device), 1: t < r}
    scores, oks, live_o, top, nb = _window_scores(q, k, valid, c, inside)
    xb = _blocks(torch.cat([v, torch.ones_like(v[..., :1])], -1), c, nb)
    gamma = gamma[..., None]  # (h, 1, 1, 1), against (b, h, nb, c, ·)
    lam = lam[..., None] if isinstance(lam, Tensor) else lam
    # the linear part's features and scales
    if exponential:
        cf = lk.detach().amax(-2, keepdim=True)  # (b, h, 1, F), over real keys
        cf = torch.where(torch.isfinite(cf), cf, 0.0)
        z = lq + cf
        tq = z.detach().amax(-1, keepdim=True)  # (b, h, n, 1)
        qf, kf = (z - tq).exp(), (lk - cf).exp()
        u = tq.clamp_min(0)
        gw = gamma * _blocks((-u).exp(), c, nb)  # (b, h, nb, c, 1)
        lw = lam * _blocks((tq - u).exp(), c, nb)
    else:
        qf, kf = lq, lk
        gw, lw = gamma, lam
    qfb, kfb = _blocks(qf, c, nb), _blocks(kf, c, nb)
    out = 0.0
    for o in inside:
        weights = gw * _softmax_terms(scores[o], oks[o], top)
        if o:  # the pairs of a neighbouring block outside the window: linear terms
            near = torch.matmul(qfb, _neighbour(kfb, o).transpose(-2, -1))
            weights = weights + lw * (near * ((~inside[o]) & live_o[o]))
        out = out + torch.matmul(weights, _neighbour(xb, o))  # (b, h, nb, c, d + 1)
    # blocks at least two away: every key outside the window, through per-block states
    states = torch.matmul(kfb.transpose(-2, -1), xb)  # (b, h, nb, F, d + 1)
    before = states.cumsum(-3)  # Σ_{B' <= B}
    after = states.flip(-3).cumsum(-3).flip(-3)  # Σ_{B' >= B}
    far = _neighbour(before, -2) + _neighbour(after, 2)
    out = out + lw * torch.matmul(qfb, far)
    out = out.reshape(b, h, nb * c, d + 1)[:, :, :n]
    num, den = out[..., :-1], out[..., -1:]
    live_rows = den > 0
    return torch.where(live_rows, num / torch.where(live_rows, den, 1.0), 0.0)
