"""Performer (FAVOR+) contenders: ours vs performer-pytorch at equal m, plus approximation error.

``contenders()`` follows ``benchmarks/common.py``: each factory builds a module (or a kernel)
and inputs for one sequence length and returns ``step``; the harness times
``step().sum().backward()``. ``errors()`` measures the error of each FAVOR+ implementation
against exact softmax attention on the same inputs and the same random matrix W.

Run ``python -m benchmarks.contenders_performer`` for a quick side-by-side table (times,
peak causal memory, errors); the full harness is ``benchmarks/attention.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch

from benchmarks.common import BATCH, D_MODEL, HEAD_DIM, HEADS, ContenderFactory, Step
from transformer_zoo import PerformerAttention
from transformer_zoo.functional import draw_projection, favor_attention, softmax_attention

NB_FEATURES = 256

try:  # peers are optional
    import performer_pytorch
except ImportError:  # pragma: no cover
    performer_pytorch = None


def _x(n: int) -> torch.Tensor:
    return torch.randn(BATCH, n, D_MODEL, requires_grad=True)


def _qkv(n: int) -> list[torch.Tensor]:
    return [torch.randn(BATCH, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3)]


def ours(causal: bool) -> ContenderFactory:
    def factory(n: int) -> Step:
        attn = PerformerAttention(D_MODEL, HEADS, nb_features=NB_FEATURES, causal=causal, seed=0)
        x = _x(n)
        return lambda: attn(x)

    return factory


def ours_kernel(causal: bool) -> ContenderFactory:
    def factory(n: int) -> Step:
        w = draw_projection(NB_FEATURES, HEAD_DIM, seed=0)
        q, k, v = _qkv(n)
        return lambda: favor_attention(q, k, v, w, causal=causal)

    return factory


def _quiet(fn):
    with contextlib.redirect_stdout(io.StringIO()):  # their causal path prints a notice
        return fn()


def peer(causal: bool) -> ContenderFactory:
    def factory(n: int) -> Step:
        attn = _quiet(lambda: performer_pytorch.SelfAttention(
            dim=D_MODEL, heads=HEADS, dim_head=HEAD_DIM, nb_features=NB_FEATURES, causal=causal
        ))
        x = _x(n)
        return lambda: attn(x)

    return factory


def peer_kernel(causal: bool) -> ContenderFactory:
    def factory(n: int) -> Step:
        fa = _quiet(lambda: performer_pytorch.FastAttention(HEAD_DIM, NB_FEATURES, causal=causal))
        q, k, v = _qkv(n)
        return lambda: fa(q, k, v)

    return factory


def contenders() -> dict[str, ContenderFactory]:
    """Name -> factory; fwd+bwd timed by the harness. Peers left out when not installed."""
    out: dict[str, ContenderFactory] = {
        "performer (transformer_zoo)": ours(False),
        "performer causal (transformer_zoo)": ours(True),
        "favor kernel (transformer_zoo)": ours_kernel(False),
        "favor kernel causal (transformer_zoo)": ours_kernel(True),
    }
    if performer_pytorch is not None:
        out.update({
            "performer SelfAttention (performer-pytorch)": peer(False),
            "performer SelfAttention causal (performer-pytorch)": peer(True),
            "FastAttention (performer-pytorch)": peer_kernel(False),
            "FastAttention causal (performer-pytorch)": peer_kernel(True),
        })
    return out


def errors(
    n: int = 1024, *, nb_features: int = NB_FEATURES, norm: float = 1.0, draws: int = 4,
    causal: bool = False, seed: int = 0,
) -> dict[str, float]:
    """Relative error ‖out − softmax‖ / ‖softmax‖ vs exact attention, same q/k/v and W.

    q, k rows have length ``norm · d^(1/4)·√…`` scaled so that q̂ has RMS entry ``norm``/√d
    (norm 1 ~ unit-variance entries); averaged over ``draws`` random matrices.
    """
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
    q, k = q * norm, k * norm
    exact = softmax_attention(q, k, v, causal=causal)
    totals: dict[str, float] = {}
    for i in range(draws):
        w = draw_projection(nb_features, HEAD_DIM, seed=seed, step=i)
        results = {"transformer_zoo": favor_attention(q, k, v, w, causal=causal)}
        if performer_pytorch is not None:
            fa = _quiet(lambda: performer_pytorch.FastAttention(HEAD_DIM, nb_features,
                                                                causal=causal))
            fa.projection_matrix.copy_(w)
            results["performer-pytorch (same W)"] = fa(q, k, v)
            fa.redraw_projection_matrix(q.device)  # their own sampler (no sign fix)
            results["performer-pytorch (own W)"] = fa(q, k, v)
        for name, out in results.items():
            err = float((out - exact).norm() / exact.norm())
            totals[name] = totals.get(name, 0.0) + err / draws
    return totals


def _time(step: Step, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step().sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:  # pragma: no cover - manual tool
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="substring filter on contender names")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, factory in contenders().items():
        if args.only not in name:
            continue
        times = [_time(factory(n), args.repeats) for n in args.lengths]
        print(f"{name:55s}", "  ".join(f"n={n}: {t * 1e3:8.1f} ms"
                                       for n, t in zip(args.lengths, times, strict=True)))
    for causal in (False, True):
        for norm in (0.5, 1.0, 1.5):
            errs = errors(1024, norm=norm, causal=causal)
            print(f"error causal={causal} norm={norm}:",
                  ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))


if __name__ == "__main__":  # pragma: no cover
    main()
