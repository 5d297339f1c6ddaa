"""Performer (FAVOR+) contenders: ours vs performer-pytorch at equal m, plus approximation error.

``contenders()`` follows ``benchmarks/common.py``: each factory builds a module (or a kernel)
and inputs for one sequence length and returns ``step``; the harness times
``step().sum().backward()``. ``errors(n)`` measures each FAVOR+ implementation against exact
softmax attention on ``error_inputs(n)`` at equal m (bidirectional and causal).

``python -m benchmarks.contenders_performer --lengths 1024 8192 --errors 1024`` prints a quick
round-robin side-by-side and writes the error table to ``benchmarks/runs/performer_errors.md``
(untracked; ``--out`` elsewhere, ``--update-results`` refreshes the committed
``benchmarks/results/performer_errors.md``); the full harness (time, peak memory, plots) is
``python -m benchmarks.attention``.
"""

from __future__ import annotations

import argparse
import contextlib
import io

import torch

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
from benchmarks.device import (
    DTYPES,
    add_device_options,
    device_info,
    timer,
    under_autocast,
)
from benchmarks.outputs import add_output_options, output_path
from transformer_zoo import OptimalPositiveFeatures, PerformerAttention
from transformer_zoo.functional import draw_projection, favor_attention, softmax_attention

NB_FEATURES = 256
OUTPUT = "performer_errors.md"

try:  # peers are optional
    import performer_pytorch
except ImportError:  # pragma: no cover
    performer_pytorch = None


def _x(n: int, device: torch.device) -> torch.Tensor:
    return randn(BATCH, n, D_MODEL, device=device, requires_grad=True)


def _qkv(n: int, device: torch.device) -> list[torch.Tensor]:
    return [randn(BATCH, HEADS, n, HEAD_DIM, device=device, requires_grad=True)
            for _ in range(3)]


def ours(causal: bool) -> ContenderFactory:
    def factory(n: int, device: torch.device = CPU) -> Step:
        attn = PerformerAttention(D_MODEL, HEADS, nb_features=NB_FEATURES, causal=causal,
                                  seed=0).to(device)
        x = _x(n, device)
        return lambda: attn(x)

    return factory


def ours_kernel(causal: bool) -> ContenderFactory:
    def factory(n: int, device: torch.device = CPU) -> Step:
        w = draw_projection(NB_FEATURES, HEAD_DIM, seed=0).to(device)
        q, k, v = _qkv(n, device)
        return lambda: favor_attention(q, k, v, w, causal=causal)

    return factory


def ours_optimal_kernel(n: int, device: torch.device = CPU) -> Step:
    """FAVOR++ at equal feature count: r = m/2 rows, antithetic pairs (F = m)."""
    w = draw_projection(NB_FEATURES // 2, HEAD_DIM, seed=0).to(device)
    q, k, v = _qkv(n, device)
    fmap = OptimalPositiveFeatures()
    return lambda: favor_attention(q, k, v, w, feature_map=fmap)


def _quiet(fn):
    with contextlib.redirect_stdout(io.StringIO()):  # their causal path prints a notice
        return fn()


def peer(causal: bool) -> ContenderFactory:
    def factory(n: int, device: torch.device = CPU) -> Step:
        attn = _quiet(lambda: performer_pytorch.SelfAttention(
            dim=D_MODEL, heads=HEADS, dim_head=HEAD_DIM, nb_features=NB_FEATURES, causal=causal
        )).to(device)
        x = _x(n, device)
        return lambda: attn(x)

    return factory


def peer_kernel(causal: bool) -> ContenderFactory:
    def factory(n: int, device: torch.device = CPU) -> Step:
        fa = _quiet(lambda: performer_pytorch.FastAttention(HEAD_DIM, NB_FEATURES,
                                                            causal=causal)).to(device)
        q, k, v = _qkv(n, device)
        return lambda: fa(q, k, v)

    return factory


def contenders() -> dict[str, ContenderFactory]:
    """Name -> factory; fwd+bwd timed by the harness. Peers left out when not installed."""
    out: dict[str, ContenderFactory] = {
        "performer (transformer_zoo)": ours(False),
        "performer causal (transformer_zoo)": ours(True),
        "favor kernel (transformer_zoo)": ours_kernel(False),
        "favor kernel causal (transformer_zoo)": ours_kernel(True),
        "favor++ kernel (transformer_zoo)": ours_optimal_kernel,
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
    n: int, device: torch.device = CPU, dtype: torch.dtype = torch.float32, *,
    nb_features: int = NB_FEATURES, draws: int = 2, scales: tuple[float, ...] = (1.0, 0.5, 0.25),
) -> dict[str, float]:
    """Relative error vs exact softmax on ``error_inputs(n)``, mean over ``draws`` matrices.

    On ``device``; the estimators get q, k, v in ``dtype``, the exact reference is fp64 on the
    fp32 inputs (so a low dtype's error includes the rounding of its inputs).

    Equal m for both implementations; performer-pytorch gets our W (so the difference is the
    stabilizers and its ε). ``scales`` multiply q and k (1.0: the harness's unit-variance
    inputs, |q̂|² ≈ 8, where FAVOR+ at m = 256 has a huge variance); "mean of V" is uniform
    attention, the output an estimator collapses to when every φ(k) becomes the same ε.
    FAVOR++ (``OptimalPositiveFeatures``) uses m/2 antithetic rows, so the same m features;
    bidirectional it measures ρ per call, causal it takes the fixed ρ = 2s²/√d that the input
    distribution implies (q, k ~ N(0, s²): E|q̂ + k̂|²/d = 2s²/√d), as a user would set it.
    """
    q0, k0, v = error_inputs(n, device=device)
    totals: dict[str, float] = {}
    for scale in scales:
        q, k = q0 * scale, k0 * scale
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))  # what the estimators get
        for causal in (False, True):
            tag = f"{' causal' if causal else ''}, q,k x{scale}"
            exact = softmax_attention(q.double(), k.double(), v.double(), causal=causal)
            count = torch.arange(1, n + 1, device=device)[:, None]
            mean = v.cumsum(-2) / count if causal else v.mean(-2, True)
            totals[f"mean of V{tag}"] = relative_error(mean.expand_as(v), exact)
            for i in range(draws):
                w = draw_projection(nb_features, HEAD_DIM, seed=0, step=i).to(device)
                with torch.no_grad():
                    results = {f"favor{tag} (transformer_zoo)": favor_attention(
                        ql, kl, vl, w, causal=causal)}
                    w_half = draw_projection(nb_features // 2, HEAD_DIM, seed=0,
                                             step=i).to(device)
                    fmap = OptimalPositiveFeatures(
                        rho=2 * scale**2 / HEAD_DIM**0.5 if causal else None)
                    results[f"favor++{tag} (transformer_zoo)"] = favor_attention(
                        ql, kl, vl, w_half, feature_map=fmap, causal=causal)
                    if performer_pytorch is not None:
                        fa = _quiet(lambda c=causal: performer_pytorch.FastAttention(
                            HEAD_DIM, nb_features, causal=c)).to(device, dtype)
                        fa.projection_matrix.copy_(w)
                        try:
                            results[f"FastAttention{tag} (performer-pytorch)"] = fa(ql, kl, vl)
                        except RuntimeError:  # a dtype it does not take: NaN in the table
                            results[f"FastAttention{tag} (performer-pytorch)"] = torch.full_like(
                                vl, float("nan"))
                for name, out in results.items():
                    totals[name] = totals.get(name, 0.0) + relative_error(out, exact) / draws
    return totals


COLUMNS = (("favor", " (transformer_zoo)", "ours, FAVOR+"),
           ("favor++", " (transformer_zoo)", "ours, FAVOR++"),
           ("FastAttention", " (performer-pytorch)", "performer-pytorch"),
           ("mean of V", "", "mean of V (uniform attention)"))


def errors_markdown(errors: dict[str, float], n: int, info: dict | None = None) -> str:
    """``errors(n)`` pivoted: one row per input setting, one column per estimator; ``info``
    (``device_info``) names the device and dtype when they are not the CPU in fp32."""
    tags = [k[len("mean of V"):] for k in errors if k.startswith("mean of V")]
    where = ""
    if info is not None and (info["device"] != "cpu" or info["dtype"] != "float32"):
        where = f" Estimators on {info['dtype']} inputs, on {info['device_name']}."
    lines = [
        "<!-- Written by `python -m benchmarks.contenders_performer --errors N`; "
        "do not edit by hand. -->",
        f"Relative error vs exact softmax (fp64), n = {n}, {HEADS} heads × {HEAD_DIM}, "
        f"{NB_FEATURES} features, mean of 2 draws of W (performer-pytorch gets ours).{where}",
        "",
        "| inputs | " + " | ".join(label for *_, label in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for tag in tags:
        cells = [errors.get(f"{name}{tag}{suffix}") for name, suffix, _ in COLUMNS]
        row = " | ".join("-" if c is None else f"{c:.3g}" for c in cells)
        lines.append(f"| {tag.lstrip(', ')} | {row} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=[], help="exact contender names")
    parser.add_argument("--errors", type=int, default=0, help="also print errors at this n")
    add_output_options(parser, OUTPUT)  # the pivoted error table (Markdown), with --errors
    add_device_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - manual tool
    args = parse_args(argv)
    out = output_path(args, OUTPUT)
    torch.manual_seed(0)
    factories = {k: f for k, f in contenders().items() if not args.only or k in args.only}
    clock = timer(args.device)
    for n in args.lengths:  # round robin: a burst of load hits every contender alike
        steps = {name: under_autocast(factory(n, device=args.device), args.device, args.dtype)
                 for name, factory in factories.items()}
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, step in steps.items():
                best[name] = min(best[name], clock(lambda s=step: s().sum().backward()))
        for name, t in best.items():
            print(f"n={n:6d} {name:55s} {t * 1e3:9.1f} ms")
    if args.errors:
        found = errors(args.errors, args.device, DTYPES[args.dtype])
        for name, err in found.items():
            print(f"error n={args.errors} {name:55s} {err:.4f}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(errors_markdown(found, args.errors, device_info(args.device, args.dtype)))
        print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
