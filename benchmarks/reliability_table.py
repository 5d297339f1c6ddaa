"""Measure reliability counts and error bounds: the generated section of docs/reliability.md.

    python -m benchmarks.reliability_table              # everything (~3-5 min on 2 cores)
    python -m benchmarks.reliability_table --no-dist    # skip the 2-process DDP/FSDP2 run
    python -m benchmarks.reliability_table --print      # print instead of writing a file
    python -m benchmarks.reliability_table --update-results  # rewrite docs/reliability.md

By default the section goes to ``benchmarks/runs/reliability_table.md`` (untracked), or
``--out``; only ``--update-results`` rewrites the committed page's section.

Uses the same case tables and measurement helpers as tests/test_reliability_*.py, so the
numbers in the docs are what the tests check (the tests assert bounds ~2.5x above these).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.outputs import RUNS, is_committed_location

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import reliability_cases as rc  # noqa: E402
import test_reliability_bad_input as bad  # noqa: E402
import test_reliability_compile as comp  # noqa: E402
import test_reliability_fuzz as fuzz  # noqa: E402
import test_reliability_precision as prec  # noqa: E402
import test_reliability_state as state  # noqa: E402
from torch._dynamo.testing import CompileCounter  # noqa: E402

from transformer_zoo import Encoder  # noqa: E402

DT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def coverage() -> dict:
    atts, encs = rc.attention_classes(), rc.encoding_classes()
    all_pairs = [(a, e) for a in atts for e in [None, *encs]]
    kernels = [n for n in rc.kernel_names() if isinstance(rc.kernel_case(n), rc.KernelCase)]
    return dict(
        attentions=[a.__name__ for a in atts], encodings=[e.__name__ for e in encs],
        pairs=len(rc.pairs()), all_pairs=len(all_pairs),
        rejected=len(all_pairs) - len(rc.pairs()), kernels=kernels,
        attention_kernels=rc.attention_kernels(),
        modules=[m.__name__ for m in rc.module_classes()],
    )


def compile_frames() -> dict:
    """Frames compiled over the dynamic lengths, per case (fullgraph: a break raises)."""
    frames = {}
    for att, enc_cls, causal in comp._dynamic_cases():
        torch._dynamo.reset()
        enc = Encoder(rc.encoder_config(att, enc_cls, n_layers=1, causal=causal)).eval()
        counter = CompileCounter()
        compiled = torch.compile(enc, backend=counter, fullgraph=True)
        for b, n in comp.DYNAMIC_SHAPES:
            x, mask = comp._inputs(n, seed=n, b=b)
            compiled(x, mask=mask)
        frames[comp._dynamic_id((att, enc_cls, causal))] = counter.frame_count
    torch._dynamo.reset()
    return frames


def distributed() -> dict:
    import torch.multiprocessing as mp
    from reliability_dist import WORLD, single_process, worker

    names = [c.__name__ for c in rc.attention_classes()]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(os.path.join(tmp, "init"), tmp, names), nprocs=WORLD,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True)
                 for r in range(WORLD)]
    out = {}
    for name in names:
        ref = single_process(name)
        for mode in ("ddp", "fsdp"):
            got = ranks[0][f"{mode}/{name}"]
            same = all(torch.equal(got[k], ranks[1][f"{mode}/{name}"][k]) for k in got)
            diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
            out[(name, mode)] = (same, diff)
    return out


def precision() -> dict:
    kernels: dict = {}
    tried = 0
    for name in rc.attention_kernels():
        causal_options = [False, True] if rc.kernel_case(name).supports_causal else [False]
        for dtype, mode in itertools.product(prec.DTYPES, ["inputs", "autocast"]):
            worst = 0.0
            for norm, d, masking, causal, n in itertools.product(
                prec.NORMS, [8, 32], ["none", "padding", "empty-sample"], causal_options, [1, 9]
            ):
                err, out, _ = prec.kernel_error(name, dtype, mode, 2, 2, n, 9, d, norm, norm,
                                                masking, causal)
                assert torch.isfinite(out).all()
                worst, tried = max(worst, err), tried + 1
            kernels[(name, DT[dtype], mode)] = worst
    encoders: dict = {}
    for pair, dtype in itertools.product(rc.pairs(), prec.DTYPES):
        small = large = 0.0
        for norm, masking, far in itertools.product(prec.NORMS, ["none", "empty-sample"],
                                                    [False, True]):
            err, out, _ = prec.encoder_error(pair, dtype, norm, norm, 6, masking, far)
            assert torch.isfinite(out).all()
            tried += 1
            if norm <= 5:
                small = max(small, err)
            else:
                large = max(large, err)
        encoders[(rc.pair_id(pair), DT[dtype])] = (small, large)
    encodings: dict = {}
    for cls, dtype in itertools.product(rc.encoding_classes(), prec.DTYPES):
        errs = [prec.encoding_error(cls, dtype, start)[0] for start in (0, 4096, 99_990)]
        tried += 3
        encodings[(cls.__name__, DT[dtype])] = max(errs)
    return dict(kernels=kernels, encoders=encoders, encodings=encodings, tried=tried)


def serialization() -> int:
    count = 0
    for cls in rc.module_classes():
        case = rc.module_case(cls)
        state._check_round_trip(lambda case=case: case.build(rc.SMALL),
                                lambda m, case=case: case.run(m, rc.SMALL))
        count += 1
    for pair in rc.pairs():
        state._check_round_trip(lambda pair=pair: Encoder(rc.encoder_config(*pair)),
                                rc.run_encoder)
        count += 1
    return count


def fuzzing(examples: int) -> Counter:
    from hypothesis import given, settings

    outcomes: Counter = Counter()

    @settings(max_examples=examples, database=None, derandomize=True, deadline=None)
    @given(case=fuzz.fuzz_cases())
    def run(case):
        outcome = fuzz.run_case(case)
        outcomes[outcome] += 1
        outcomes[(case["attention"].__name__, outcome)] += 1

    run()
    return outcomes


def bad_input_count() -> int:
    return (
        len(bad.MODULE_CASES + bad.ATTENTION_ONLY) * len(rc.attention_classes())
        + len(bad.MODULE_CASES) * len(rc.pairs())
        + len(bad.KERNEL_CASES) * len(rc.attention_kernels())
        + 2 * len(rc.encoding_classes())
    )


def render(cov, frames, dist, pr, n_round_trips, fz, n_bad, seconds) -> str:
    lines = [
        "<!-- generated by `python -m benchmarks.reliability_table`; do not edit by hand -->",
        "",
        f"Measured on torch {torch.__version__}, CPU, in {seconds:.0f} s.",
        "",
        "| check | what | count | result |",
        "|---|---|---|---|",
        f"| coverage | attentions × (no encoding + encodings) | {cov['pairs']} runnable pairs "
        f"of {cov['all_pairs']} | {cov['rejected']} rejected at construction with ValueError |",
        f"| torch.compile | kernels with `fullgraph=True` | {len(cov['kernels'])} kernels | "
        "no graph break, equal to eager |",
        f"| torch.compile | encoder, train steps of one shape | {cov['pairs']} pairs | "
        "1 frame each (no recompiles across steps) |",
        f"| torch.compile | dynamic (batch, length) {comp.DYNAMIC_SHAPES} | {len(frames)} cases | "
        f"at most {max(frames.values())} frames (static, then dynamic) |",
    ]
    if dist:
        worst = max(d for _, d in dist.values())
        same = all(s for s, _ in dist.values())
        lines.append(
            f"| DDP + FSDP2 (gloo, 2 ranks) | {len(cov['attentions'])} attentions × 2 modes, "
            f"3 SGD steps | {len(dist)} runs | ranks bit-identical: {same}; "
            f"max \\|Δ\\| vs single process {worst:.1e} |"
        )
    lines += [
        f"| mixed precision | bf16 + fp16: kernels, encoders, encodings | {pr['tried']} "
        "configurations | no inf/NaN; fully masked rows 0 |",
        f"| serialization | state_dict → torch.save → torch.load(weights_only=True) | "
        f"{n_round_trips} modules/encoders | bit-exact outputs |",
        f"| fuzzing | random EncoderConfig + inputs, fwd + bwd | {fz['ok'] + fz['rejected']} "
        f"configs | {fz['ok']} ran finite, {fz['rejected']} documented ValueError, 0 other |",
        f"| bad input | wrong rank/shape/dtype/device, non-bool masks, empty | {n_bad} cases | "
        "ValueError/TypeError naming expected and received |",
        "",
        "### Mixed precision: attention kernels",
        "",
        "Max |low − fp32| / max(max|v|, max|out|) over |q| = |k| ∈ {0.1 … 50}, head dims 8 "
        "and 32, "
        "n ∈ {1, 9}, no mask / padding / a fully masked sample, causal or not; the fp32 "
        "reference sees the same rounded inputs. Test bound: bf16 "
        f"{prec.KERNEL_BOUND[torch.bfloat16]:.0e}, fp16 {prec.KERNEL_BOUND[torch.float16]:.0e}.",
        "",
        "| kernel | dtype | low-precision inputs | fp32 inputs under autocast |",
        "|---|---|---|---|",
    ]
    for name in cov["attention_kernels"]:
        for dt in DT.values():
            lines.append(f"| `{name}` | {dt} | {pr['kernels'][(name, dt, 'inputs')]:.1e} | "
                         f"{pr['kernels'][(name, dt, 'autocast')]:.1e} |")
    lines += [
        "",
        "### Mixed precision: encoders under autocast",
        "",
        "Max |autocast − fp32| of a 1-layer encoder's output (unit scale after the final "
        "norm); positions near 0 and far (10^4, or the end of a learned table). "
        f"Test bound at |q|, |k| ≤ 5: bf16 {prec.ENCODER_BOUND[torch.bfloat16]:.0e}, fp16 "
        f"{prec.ENCODER_BOUND[torch.float16]:.0e}. Beyond that, rounding q and k themselves "
        "moves logits by ~|q||k|·u/√d (u = 2⁻⁸ bf16, 2⁻¹¹ fp16): large errors there are the "
        "format, not a kernel defect, and are not bounded by the tests (finite only).",
        "",
        "| pair | dtype | \\|q\\|,\\|k\\| ≤ 5 | \\|q\\|,\\|k\\| ∈ {10, 30, 50} |",
        "|---|---|---|---|",
    ]
    for (pid, dt), (small, large) in pr["encoders"].items():
        lines.append(f"| {pid} | {dt} | {small:.1e} | {large:.1e} |")
    lines += [
        "",
        "### Mixed precision: positional encodings",
        "",
        "Max relative error of the encoding's output on low-precision inputs vs fp32, "
        "positions from 0, 4096 and 99 990 (clipped to a learned table). Test bound: bf16 "
        f"{prec.ENCODING_BOUND[torch.bfloat16]:.0e}, fp16 "
        f"{prec.ENCODING_BOUND[torch.float16]:.0e}.",
        "",
        "| encoding | bf16 | fp16 |",
        "|---|---|---|",
    ]
    for name in cov["encodings"]:
        lines.append(f"| {name} | {pr['encodings'][(name, 'bf16')]:.1e} | "
                     f"{pr['encodings'][(name, 'fp16')]:.1e} |")
    if dist:
        lines += [
            "",
            "### Distributed vs single process",
            "",
            "Max |Δ| over all parameters and buffers after 3 SGD steps (lr 0.05), fp32; "
            "test tolerance atol 1e-5, rtol 1e-4.",
            "",
            "| attention | DDP | FSDP2 |",
            "|---|---|---|",
        ]
        for name in cov["attentions"]:
            lines.append(f"| {name} | {dist[(name, 'ddp')][1]:.1e} | "
                         f"{dist[(name, 'fsdp')][1]:.1e} |")
    lines += ["", "### Fuzzing outcomes per attention", "", "| attention | ran | rejected |",
              "|---|---|---|"]
    for name in cov["attentions"]:
        lines.append(f"| {name} | {fz[(name, 'ok')]} | {fz[(name, 'rejected')]} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"
PAGE = ROOT / "docs" / "reliability.md"  # committed; rewritten only with --update-results
DEFAULT_OUT = RUNS / "reliability_table.md"


def output_file(args: argparse.Namespace) -> Path:
    """The committed page with ``--update-results``, else ``--out``, else ``DEFAULT_OUT``."""
    if args.update_results:
        return PAGE
    out = DEFAULT_OUT if args.out is None else args.out
    if out.resolve() == PAGE.resolve() or is_committed_location(out):
        raise SystemExit(f"--out {out}: a committed file; pass --update-results to refresh it")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-dist", action="store_true")
    parser.add_argument("--print", action="store_true")
    parser.add_argument("--fuzz", type=int, default=300)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="where to write the section (default: "
                       "benchmarks/runs/reliability_table.md, untracked)")
    where.add_argument("--update-results", action="store_true",
                       help="rewrite the generated section of the committed "
                       "docs/reliability.md instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = output_file(args)
    torch.set_num_threads(1)
    start = time.perf_counter()
    cov = coverage()
    frames = compile_frames()
    dist = {} if args.no_dist else distributed()
    pr = precision()
    n_round_trips = serialization()
    fz = fuzzing(args.fuzz)
    table = render(cov, frames, dist, pr, n_round_trips, fz, bad_input_count(),
                   time.perf_counter() - start)
    if args.print:
        print(table)
        return
    if out == PAGE:
        head, rest = PAGE.read_text().split(BEGIN)
        _, tail = rest.split(END)
        PAGE.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
