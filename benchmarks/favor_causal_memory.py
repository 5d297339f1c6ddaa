"""Causal FAVOR+ before/after tiling the features: peak memory and time of one fwd+bwd step.

    python -m benchmarks.favor_causal_memory                    # writes benchmarks/runs/
    python -m benchmarks.favor_causal_memory --update-results   # benchmarks/results/

"before" is the package at ``--before REV`` (default: the commit before causal FAVOR+ was
tiled end to end), "after" the one at ``--after REV`` (default HEAD; ``--after worktree``:
this working tree as it is), each exported with ``git archive`` into a temporary folder
(committed snapshots; nothing in the work tree is touched), both measured in the same run,
interleaved. Peak memory with ``benchmarks/memory.py``'s protocol (VmHWM − VmRSS around ONE
step after a length-64 warm-up, ``MALLOC_MMAP_THRESHOLD_=65536``): the largest length in a
fresh process per contender and version, the smaller lengths in increasing order in another.
Time in other processes without that setting: median over ``--rounds`` processes per
version × ``--steps`` steps, each length after one warm-up step. Contenders: the
causal FAVOR+ kernel and module (``benchmarks/contenders_performer.py``: b = 1, d_model 512,
8 heads × 64, F = 256) and nn.MultiheadAttention for the memory target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.memory import MALLOC_ENV
from benchmarks.outputs import add_output_options, output_path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "4e9a17d"  # the last commit whose causal FAVOR+ built the (b, h, n, F) features
OUTPUT = "favor_causal_memory"
CONTENDERS = [("benchmarks.contenders_performer", "favor kernel causal (transformer_zoo)"),
              ("benchmarks.contenders_performer", "performer causal (transformer_zoo)"),
              ("benchmarks.contenders_softmax", "nn.MultiheadAttention")]
_MARK = "@@RESULT "
_TIMER = """
import json, statistics, sys, time, importlib, torch
spec, lengths = json.loads(sys.argv[1]), json.loads(sys.argv[2])
steps, threads = int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
result = {}
for module, name in spec:
    factory = importlib.import_module(module).contenders()[name]
    factory(64)().sum().backward()
    for n in lengths:
        step = factory(n)
        step().sum().backward()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step().sum().backward()
            times.append(time.perf_counter() - start)
        result[f"{name}@{n}"] = times
        del step
print("@@RESULT " + json.dumps(result))
"""
_PEAK = """
import json, sys, importlib, torch
from benchmarks.memory import fwd_bwd, peak_of_one_step
module, name, lengths, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
factory = importlib.import_module(module).contenders()[name]
result = {}
for n in lengths:  # increasing: each step's freed memory went back (MALLOC_MMAP_THRESHOLD_)
    fwd_bwd(factory(64))
    result[str(n)] = peak_of_one_step(factory(n))["peak_bytes"]
print("@@RESULT " + json.dumps(result))
"""


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> object:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}


def _env(tree: Path, malloc: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)
    return dict(env, **MALLOC_ENV) if malloc else env


def _short(rev: str) -> str:
    if rev in ("none", "worktree"):
        return rev
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def export(rev: str, into: Path) -> Path:
    """The package and benchmarks at ``rev``, from ``git archive`` (no work tree touched)."""
    into.mkdir(parents=True)
    data = subprocess.run(["git", "archive", rev, "transformer_zoo", "benchmarks"], cwd=ROOT,
                          capture_output=True, check=True).stdout
    archive = into / "tree.tar"
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def add_revision_options(p: argparse.ArgumentParser, before: str) -> None:
    """--before / --after: the two trees a before/after memory table compares."""
    p.add_argument("--before", default=before, help="git revision for the 'before' column, "
                   "or 'none'")
    p.add_argument("--after", default="HEAD", help="git revision for the 'after' column, or "
                   "'worktree'")


def revision_trees(before: str, after: str, tmp: Path) -> dict[str, Path]:
    """{"before"?: exported tree, "after": exported tree or this work tree} under ``tmp``."""
    trees = {}
    if before != "none":
        trees["before"] = export(before, tmp / "before")
    trees["after"] = ROOT if after == "worktree" else export(after, tmp / "after")
    return trees


def measure(trees: dict[str, Path], lengths: list[int], rounds: int, steps: int,
            threads: int, parallel: int = 1, on_memory=None) -> list[dict]:
    """Peak memory: the largest length in a fresh process of its own per contender and
    version, the smaller ones together in another (increasing order), ``parallel`` of these
    processes at a time; ``on_memory(rows)`` once they are done. Time: one process per
    version and round (interleaved) running every contender at every length."""
    jobs = []
    for module, name in CONTENDERS:
        versions = trees if "transformer_zoo" in name else {"after": trees["after"]}
        for version, tree in versions.items():
            for group in ([n for n in lengths if n != max(lengths)], [max(lengths)]):
                if group:
                    jobs.append((module, name, version, tree, group))

    def peak(job):  # memory is per process: concurrent processes do not change it
        module, name, version, tree, group = job
        return _run([sys.executable, "-c", _PEAK, module, name, json.dumps(group),
                     str(threads)], tree, _env(tree, True), 1800)

    rows = {}
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        for (_module, name, version, _tree, group), got in zip(jobs, pool.map(peak, jobs),
                                                             strict=True):
            for n in group:
                value = got.get(str(n)) if isinstance(got, dict) else None
                rows[(n, name, version)] = {
                    "n": n, "contender": name, "version": version, "times": [],
                    "peak_mib": None if value is None else value / 2**20,
                    "error": got.get("error") if isinstance(got, dict) else None}
    print("memory: done", flush=True)
    if on_memory is not None:
        on_memory(sorted(rows.values(), key=lambda r: (r["n"], r["contender"], r["version"])))
    timed = [c for c in CONTENDERS if "transformer_zoo" in c[1]]
    for r in range(rounds):  # interleaved: before, after, before, after, ...
        for version, tree in trees.items():
            got = _run([sys.executable, "-c", _TIMER, json.dumps(timed), json.dumps(lengths),
                        str(steps), str(threads)], tree, _env(tree, False), 1800)
            for (_, name) in timed:
                for n in lengths:
                    times = got.get(f"{name}@{n}", []) if isinstance(got, dict) else []
                    rows[(n, name, version)]["times"] += times if isinstance(times, list) else []
            print(f"time round {r} {version}: done", flush=True)
    for row in rows.values():
        row["median_s"] = statistics.median(row["times"]) if row["times"] else None
    return sorted(rows.values(), key=lambda r: (r["n"], r["contender"], r["version"]))


def markdown(rows: list[dict], meta: dict) -> str:
    lengths = sorted({r["n"] for r in rows})
    get = {(r["n"], r["contender"], r["version"]): r for r in rows}
    out = ["<!-- Written by `python -m benchmarks.favor_causal_memory`; do not edit by hand. -->",
           f"b = 1, d_model 512, 8 heads × 64, F = 256, fp32, CPU, {meta['threads']} thread(s); "
           f"{meta['machine']}; load average {meta['load']} at the start. Before = "
           f"`{meta['before']}` (features built in full), after = `{meta['after']}`; one run, "
           "interleaved (see the module docstring).", "",
           "| contender | n | peak before | peak after | after / before | after / MHA "
           "| time before | time after | after / before |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in [c[1] for c in CONTENDERS if "transformer_zoo" in c[1]]:
        for n in lengths:
            b, a = get.get((n, name, "before")), get[(n, name, "after")]
            mha = get[(n, "nn.MultiheadAttention", "after")]["peak_mib"]

            def mib(r):
                return "—" if r is None or r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"

            def ms(r):
                none = r is None or r.get("median_s") is None
                return "—" if none else f"{1e3 * r['median_s']:.0f} ms"

            def ratio(x, y):
                return "—" if x is None or y is None else f"{x / y:.2f}x"

            out.append(f"| {name} | {n} | {mib(b)} | {mib(a)} | "
                       f"{ratio(a['peak_mib'], b and b['peak_mib'])} | "
                       f"{ratio(a['peak_mib'], mha)} | {ms(b)} | {ms(a)} | "
                       f"{ratio(a.get('median_s'), b and b.get('median_s'))} |")
    mhas = ", ".join(f"n = {n}: {get[(n, 'nn.MultiheadAttention', 'after')]['peak_mib']:.0f} MiB"
                     for n in lengths)
    out += ["", f"nn.MultiheadAttention peak memory: {mhas}."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    add_revision_options(p, BEFORE)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=1,
                   help="memory processes at a time (peak memory is per process)")
    add_output_options(p, OUTPUT)
    args = p.parse_args()
    out = output_path(args, OUTPUT)
    with tempfile.TemporaryDirectory() as tmp:
        trees = revision_trees(args.before, args.after, Path(tmp))
        meta = {"before": _short(args.before), "after": _short(args.after),
                "threads": args.threads, "machine": platform.processor() or platform.machine(),
                "load": round(os.getloadavg()[0], 1), "cores": os.cpu_count()}
        base = out.with_suffix("")  # writes <base>.json and <base>.md
        base.parent.mkdir(parents=True, exist_ok=True)

        def write(rows: list[dict]) -> None:
            Path(f"{base}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1)
                                            + "\n")
            Path(f"{base}.md").write_text(markdown(rows, meta))

        rows = measure(trees, args.lengths, args.rounds, args.steps, args.threads,
                       args.parallel, on_memory=write)  # memory first, then with times
    write(rows)
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
