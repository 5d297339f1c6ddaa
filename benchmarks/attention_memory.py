"""Peak memory of every attention module against nn.MultiheadAttention, before/after a change.

    python -m benchmarks.attention_memory                    # writes benchmarks/runs/
    python -m benchmarks.attention_memory --update-results   # benchmarks/results/

The issue-16 target: no attention in the library above nn.MultiheadAttention's peak memory at
n = 8192 (b = 1, d_model 512, 8 heads × 64, fp32, one forward + backward). Contenders: the
modules (and kernels) the attention benchmark lists (``contenders_softmax``,
``contenders_performer``, ``contenders_nystrom``) plus what it does not list: the FAVOR++
module and the learned-feature Performers (Hedgehog, T2R, learned positive features),
bidirectional and causal, F = 256. Each (contender, length, version) is measured in a fresh
process with ``benchmarks/memory.py``'s protocol (VmHWM − VmRSS around ONE step after a
length-64 warm-up, ``MALLOC_MMAP_THRESHOLD_=65536``, 1 thread: memory does not depend on
load). "before" is the package at ``--before REV`` and "after" at ``--after REV`` (default
HEAD; ``worktree``: this tree), exported with ``git archive`` (nothing in the work tree is
touched); nn.MultiheadAttention is measured in the "after" tree.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.favor_causal_memory import (
    _env,
    _run,
    _short,
    add_revision_options,
    revision_trees,
)
from benchmarks.outputs import add_output_options, output_path

BEFORE = "5741d88"  # the last commit before the issue-16 memory work on these modules
OUTPUT = "attention_memory"
MHA = "nn.MultiheadAttention"
LISTED = [("benchmarks.contenders_softmax", MHA),
          ("benchmarks.contenders_softmax", "SoftmaxAttention"),
          ("benchmarks.contenders_performer", "performer (transformer_zoo)"),
          ("benchmarks.contenders_performer", "performer causal (transformer_zoo)"),
          ("benchmarks.contenders_performer", "favor kernel (transformer_zoo)"),
          ("benchmarks.contenders_performer", "favor kernel causal (transformer_zoo)"),
          ("benchmarks.contenders_performer", "favor++ kernel (transformer_zoo)"),
          ("benchmarks.contenders_nystrom", "NystromAttention")]
#: PerformerAttention with these feature maps (not in the attention benchmark), name -> spec
MAPS = {"FAVOR++": "OptimalPositiveFeatures(rho=0.25)", "Hedgehog": "HedgehogFeatures()",
        "T2R": "T2RFeatures()", "learned positive": "LearnedPositiveFeatures()"}
_PEAK = """
import json, sys, importlib, torch
from benchmarks.memory import peak_of_one_step, fwd_bwd
module, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
if module == "map":  # PerformerAttention(feature_map=<spec>, causal=<flag>)
    import transformer_zoo as tz
    from benchmarks.common import BATCH, CPU, D_MODEL, HEADS, randn
    spec, causal = json.loads(name)
    def factory(n):
        attn = tz.PerformerAttention(D_MODEL, HEADS, nb_features=256, causal=causal, seed=0,
                                     feature_map=eval(spec, vars(tz)))
        x = randn(BATCH, n, D_MODEL, requires_grad=True)
        return lambda: attn(x)
else:
    factory = importlib.import_module(module).contenders()[name]
fwd_bwd(factory(64))
print("@@RESULT " + json.dumps(peak_of_one_step(factory(n))))
"""


def contenders() -> list[tuple[str, str, str]]:
    """(label, module or "map", name or the map's JSON spec)."""
    found = [(name, module, name) for module, name in LISTED]
    for label, spec in MAPS.items():
        for causal in (False, True):
            found.append((f"PerformerAttention, {label}{' causal' if causal else ''}", "map",
                          json.dumps([spec, causal])))
    return found


def measure(trees: dict[str, Path], lengths: list[int], parallel: int) -> list[dict]:
    jobs = [(label, module, name, version, tree, n)
            for label, module, name in contenders()
            for version, tree in (trees.items() if label != MHA else [("after", trees["after"])])
            for n in lengths]

    def peak(job):
        _label, module, name, _version, tree, n = job
        return _run([sys.executable, "-c", _PEAK, module, name, str(n)], tree,
                    _env(tree, True), 1800)

    rows = []
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        for (label, _m, _n, version, _t, n), got in zip(jobs, pool.map(peak, jobs), strict=True):
            ok = isinstance(got, dict) and "peak_bytes" in got
            rows.append({"contender": label, "n": n, "version": version,
                         "peak_mib": got["peak_bytes"] / 2**20 if ok else None,
                         "error": None if ok else (got or {}).get("error")})
            print(f"{label} n={n} {version}: {rows[-1]['peak_mib']}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lengths = sorted({r["n"] for r in rows})
    get = {(r["contender"], r["n"], r["version"]): r["peak_mib"] for r in rows}
    head = " | ".join(f"n = {n}: before | after | after / MHA" for n in lengths)
    out = ["<!-- Written by `python -m benchmarks.attention_memory`; do not edit by hand. -->",
           f"Peak memory of one fwd+bwd step (VmHWM − VmRSS, fresh process), b = 1, d_model "
           f"512, 8 heads × 64, F = 256, fp32, CPU, 1 thread; {meta['machine']}. Before = "
           f"`{meta['before']}`, after = `{meta['after']}`.", "",
           f"| contender | {head} |", "|---|" + "---:|---:|---:|" * len(lengths)]

    def mib(x):
        return "—" if x is None else f"{x:.0f} MiB"

    for label, *_ in contenders():
        cells = []
        for n in lengths:
            after, mha = get.get((label, n, "after")), get.get((MHA, n, "after"))
            before = get.get((label, n, "before"))
            ratio = "—" if after is None or not mha else f"{after / mha:.2f}x"
            cells += [mib(before) if label != MHA else "", mib(after), ratio]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    add_revision_options(p, BEFORE)
    p.add_argument("--parallel", type=int, default=2,
                   help="processes at a time (peak memory is per process)")
    add_output_options(p, OUTPUT)
    args = p.parse_args()
    out = output_path(args, OUTPUT)
    with tempfile.TemporaryDirectory() as tmp:
        trees = revision_trees(args.before, args.after, Path(tmp))
        meta = {"before": _short(args.before), "after": _short(args.after),
                "machine": platform.processor() or platform.machine(), "threads": 1}
        rows = measure(trees, args.lengths, args.parallel)
    base = out.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{base}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    Path(f"{base}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
