"""One prepared GPU check, all in one folder, in a fixed time budget (default 420 s).

    python -m benchmarks.gpu_check                 # on a machine with one CUDA GPU
    python -m benchmarks.gpu_check --dry-run       # on the CPU, tiny sizes: the plumbing
    DEVICE=cpu python -m benchmarks.gpu_check      # the same dry run

Phases, in order, each a subprocess with its own log and a time cap cut to what is left of
the budget (a capped process gets SIGINT, then is killed):

1. peers as wheels: ``pip install --no-index --find-links WHEELS --no-deps WHEELS/*.whl``
   when the wheels folder (``--wheels``, default ``$WHEELS`` or ``benchmarks/wheels/``, an
   ignored folder: carry it) has any; otherwise a note (the contenders and tests of a
   missing peer skip themselves). ``--fetch-wheels`` fills the folder beforehand, where the
   package index is reachable;
2. the environment: GPU name, torch / CUDA versions, ``nvidia-smi``, which peers import;
3. in the background from here on: LRA ListOps data (``listops --full --prepare-data`` on the
   CPU cores the tests leave free);
4. the CUDA test run: ``pytest --device cuda`` over every test file, split into
   ``--pytest-workers`` processes sharing the GPU (``--maxfail`` each, not ``-x``: one run
   must find as much as it can), capped at ``--pytest-cap`` s;
5. the attention benchmark at n = 1k..32k, bf16 then fp32 (``--attention-cap`` s each; a
   capped run keeps the lengths it finished, ``attention-*.partial.json``), and the SDPA
   kernel probe (``sdpa_kernels``) in both dtypes;
6. the LRA preset (``listops --full``) one variant at a time, softmax and nystrom-64 first
   (the accuracy targets), each with ``--lra-budget`` s of training (validations
   included), for as many variants as fit; their tables merged with the paper's column.

Everything goes into ``--out`` (default ``$OUT`` if set, else ``benchmarks/runs/gpu_check/``):
``summary.md`` / ``summary.json`` (every phase: command, status, seconds), the logs, and
each benchmark's JSON and tables. Nothing tracked is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.outputs import RUNS
from benchmarks.phases import REPO, Budget, partition, pytest_counts, run, start, stop

PEERS = ("fla", "performer_pytorch", "nystrom_attention", "rotary_embedding_torch",
         "transformers", "triton", "matplotlib", "tqdm")
#: The peers that travel as wheels (pure Python; their own deps einops and torch are on the
#: image): the versions installed here, fla's newest.
WHEELS = ("performer-pytorch", "local-attention", "hyper-connections", "torch-einops-utils",
          "axial-positional-embedding", "nystrom-attention", "rotary-embedding-torch",
          "flash-linear-attention", "fla-core")
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
LRA_VARIANTS = ("softmax", "nystrom-64", "performer-relu-256")
#: the dry run's stand-ins: every phase on tiny sizes, on the CPU
DRY_PYTEST = ["tests/test_device.py", "-k", "SoftmaxAttention-none and not causal"]
DRY_ATTENTION = ["--lengths", "32", "64", "--repeats", "1", "--min-seconds", "0",
                 "--no-memory", "--error-lengths", "--contenders", "SoftmaxAttention",
                 "F.sdpa", "favor kernel causal (transformer_zoo)"]
DRY_LRA = ["--steps", "4", "--eval-every", "2", "--examples", "48", "16", "16", "--lengths",
           "10", "30", "--batch-size", "8", "--no-isolate"]


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def install_wheels(folder: Path, out: Path, cap: float) -> dict[str, Any]:
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"phase": "wheels", "status": f"no wheels in {folder}: peers on the image only",
                "seconds": 0.0}
    cmd = python("-m", "pip", "install", "--no-index", "--find-links", str(folder), "--no-deps",
                 *map(str, wheels))
    return run("wheels", cmd, out / "wheels.log", cap)


def fetch_wheels_cmd(folder: Path) -> list[str]:
    """``pip download`` of the peers' wheels into ``folder`` (run where the package index is
    reachable, before a GPU run; the folder then travels with the tree)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in WHEELS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return python("-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest",
                  str(folder), *pinned)


def environment(out: Path, device: str, cap: float) -> dict[str, Any]:
    """What ran where: written to env.json (and nvidia-smi's output to env.log)."""
    probe = ("import importlib.util, json, platform, sys, torch\n"
             f"peers = {list(PEERS)!r}\n"
             "info = dict(python=platform.python_version(), torch=torch.__version__,\n"
             "            cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),\n"
             "            peers={p: importlib.util.find_spec(p) is not None for p in peers})\n"
             "if torch.cuda.is_available():\n"
             "    info['gpu'] = torch.cuda.get_device_name(0)\n"
             "    props = torch.cuda.get_device_properties(0)\n"
             "    info['gpu_memory_gib'] = props.total_memory / 2**30\n"
             "    info['bf16'] = torch.cuda.is_bf16_supported()\n"
             "print(json.dumps(info))\n")
    begin = time.monotonic()
    info: dict[str, Any] = {"device": device}
    try:
        proc = subprocess.run(python("-c", probe), capture_output=True, text=True,
                              timeout=max(1.0, cap), cwd=REPO)
        if proc.returncode == 0:
            info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            info["error"] = proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        info["error"] = f"the probe took over {cap:.0f} s"
    smi = shutil.which("nvidia-smi")
    if smi:
        smi_out = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        (out / "env.log").write_text(smi_out.stdout + smi_out.stderr)
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    return {"phase": "environment", "status": "ok" if "error" not in info else "failed",
            "seconds": round(time.monotonic() - begin, 1), "info": info}


def run_tests(out: Path, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """pytest in ``--pytest-workers`` processes at once, one shared deadline."""
    cap = min(args.pytest_cap, budget.left() - args.reserve)
    base = python("-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--device",
                  args.device, f"--maxfail={args.maxfail}")
    if args.dry_run:
        groups = [DRY_PYTEST]
    else:
        files = sorted((REPO / "tests").glob("test_*.py"))
        groups = [[str(f.relative_to(REPO)) for f in g]
                  for g in partition(files, args.pytest_workers)]
    record: dict[str, Any] = {"phase": "pytest", "groups": groups}
    if cap <= 5:
        return dict(record, status="skipped: no time left", seconds=0.0)
    begin = time.monotonic()
    running = [start(base + g, out / f"pytest-{i + 1}.log") for i, g in enumerate(groups)]
    timed_out = False
    for proc, handle in running:
        try:
            proc.wait(timeout=max(0.1, cap - (time.monotonic() - begin)))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
        handle.close()
    totals: dict[str, int] = {}
    failures: list[str] = []
    for i in range(len(groups)):
        log = (out / f"pytest-{i + 1}.log").read_text(errors="replace")
        for k, v in pytest_counts(log).items():
            totals[k] = totals.get(k, 0) + v
        failures += [ln for ln in log.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    status = "ok" if not timed_out and not totals.get("failed") and not totals.get("errors") \
        else ("stopped at its cap" if timed_out else "failures")
    (out / "pytest.json").write_text(json.dumps({"counts": totals, "failures": failures,
                                                 "groups": groups}, indent=1) + "\n")
    return dict(record, status=status, counts=totals, failures=len(failures),
                seconds=round(time.monotonic() - begin, 1))


def attention_cmd(args: argparse.Namespace, dtype: str, out: Path) -> list[str]:
    sizes = DRY_ATTENTION if args.dry_run else [
        "--lengths", *map(str, LENGTHS), "--repeats", "3", "--min-seconds", "0.2",
        "--max-step-seconds", "2", "--timeout", "60", "--error-lengths", "1024"]
    return python("-m", "benchmarks.attention", "--device", args.device, "--dtype", dtype,
                  *sizes, "--out", str(out / f"attention-{dtype}.json"))


def lra_cmd(args: argparse.Namespace, variant: str, seconds: float, out: Path) -> list[str]:
    extra = [*DRY_LRA, "--cache-dir", str(out / "cache")] if args.dry_run else []
    return python("-m", "benchmarks.listops", "--full", "--device", args.device, "--dtype",
                  args.lra_dtype, "--variants", variant, "--time-budget", f"{seconds:.0f}",
                  "--quiet", *extra, "--out", str(out / f"listops-{variant}"))


def data_cmd(args: argparse.Namespace, out: Path) -> list[str]:
    extra = [*DRY_LRA, "--cache-dir", str(out / "cache")] if args.dry_run else []
    workers = max(1, (os.cpu_count() or 2) - args.pytest_workers - 2)
    return python("-m", "benchmarks.listops", "--full", "--prepare-data", "--data-workers",
                  str(1 if args.dry_run else workers), *extra, "--out", str(out / "listops"))


def merge_lra(out: Path, variants: list[str]) -> str | None:
    """The variants' runs in one table (paper column included), written to listops/."""
    from benchmarks.listops.report import loss_note, markdown_table, write_all

    results = [json.loads(p.read_text()) for v in variants
               if (p := out / f"listops-{v}" / "listops.json").exists()]
    if not results:
        return None
    merged = dict(results[0], runs=[run for r in results for run in r["runs"]],
                  total_seconds=sum(r["total_seconds"] for r in results))
    (out / "listops").mkdir(parents=True, exist_ok=True)
    write_all(merged, out / "listops")
    return markdown_table(merged) + "\n\n" + loss_note(merged)


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# GPU check", "", f"device {summary['device']}, budget {summary['budget_s']:.0f} s,"
             f" {summary['seconds']:.0f} s in all{' (dry run)' if summary['dry_run'] else ''}",
             "", "| phase | status | seconds |", "|---|---|---:|"]
    for p in summary["phases"]:
        extra = f" {p['counts']}" if "counts" in p else ""
        lines.append(f"| {p['phase']} | {p['status']}{extra} | {p.get('seconds', 0):.0f} |")
    for name, verdicts in summary.get("targets", {}).items():
        if verdicts:
            lines += ["", f"**{name}**", "", *(f"- {v}" for v in verdicts)]
    if summary.get("failures"):
        lines += ["", "**test failures** (first 40; all in pytest.json)", "",
                  *(f"- `{f}`" for f in summary["failures"][:40])]
    if summary.get("lra_table"):
        lines += ["", "**LRA ListOps**", "", summary["lra_table"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU with tiny sizes (also: DEVICE=cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $OUT, else benchmarks/runs/gpu_check)")
    p.add_argument("--wheels", type=Path,
                   default=Path(os.environ.get("WHEELS", REPO / "benchmarks" / "wheels")))
    p.add_argument("--fetch-wheels", action="store_true",
                   help="download the peers' wheels into --wheels and stop (needs the index)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for everything")
    p.add_argument("--reserve", type=float, default=5.0,
                   help="seconds kept back for writing the summary")
    p.add_argument("--pytest-cap", type=float, default=110.0)
    p.add_argument("--pytest-workers", type=int, default=4)
    p.add_argument("--maxfail", type=int, default=25, help="per pytest process")
    p.add_argument("--attention-cap", type=float, default=70.0, help="seconds per dtype")
    p.add_argument("--lra-budget", type=float, default=75.0,
                   help="training seconds per LRA variant (validations included)")
    p.add_argument("--lra-overhead", type=float, default=35.0,
                   help="seconds a variant needs beyond its training (start-up, test split)")
    p.add_argument("--lra-variants", nargs="+", default=list(LRA_VARIANTS))
    p.add_argument("--lra-dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    args = p.parse_args(argv)
    args.dry_run = args.dry_run or os.environ.get("DEVICE") == "cpu"
    args.device = "cpu" if args.dry_run else os.environ.get("DEVICE", "cuda")
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RUNS / "gpu_check"
    if args.dry_run:
        args.pytest_workers, args.lra_budget, args.lra_overhead = 1, 3.0, 30.0
        args.lra_variants = args.lra_variants[:2]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.fetch_wheels:
        return {"fetch_wheels": subprocess.run(fetch_wheels_cmd(args.wheels), cwd=REPO).returncode}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    phases: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        phases.append(record)
        print(f"[{args.budget - budget.left():5.0f} s] {record['phase']}: {record['status']}",
              flush=True)

    log(install_wheels(args.wheels, out, min(90.0, budget.left() - args.reserve)))
    env = environment(out, args.device, min(60.0, budget.left() - args.reserve))
    log(env)
    if not args.dry_run and not env["info"].get("cuda_available"):
        raise SystemExit("torch.cuda.is_available() is False: run with --dry-run on a CPU")
    data, data_log = start(data_cmd(args, out), out / "data.log")  # LRA data, in the background
    log(run_tests(out, args, budget))
    targets: dict[str, list[str]] = {}
    for dtype in ("bf16", "fp32"):
        cap = min(args.attention_cap, budget.left() - args.reserve)
        log(run(f"attention {dtype}", attention_cmd(args, dtype, out),
                out / f"attention-{dtype}.log", cap))
        result, partial = out / f"attention-{dtype}.json", out / f"attention-{dtype}.partial.json"
        if result.exists():
            targets[f"attention {dtype}"] = json.loads(result.read_text()).get("targets", [])
        elif partial.exists():
            done = json.loads(partial.read_text())["done_up_to_length"]
            targets[f"attention {dtype}"] = [f"capped: lengths up to {done} in {partial.name}"]
        probe = python("-m", "benchmarks.sdpa_kernels", "--device", args.device, "--dtype",
                       dtype, "--n", "64" if args.dry_run else "4096",
                       "--out", str(out / f"sdpa_kernels-{dtype}.json"))
        log(run(f"sdpa kernels {dtype}", probe, out / f"sdpa_kernels-{dtype}.log",
                min(60.0, budget.left() - args.reserve)))
        found = out / f"sdpa_kernels-{dtype}.json"
        if found.exists():
            cases = json.loads(found.read_text())["cases"]
            targets[f"SDPA kernel {dtype}"] = [
                f"{case}: SoftmaxAttention {'runs' if r['same'] else 'does NOT run'} the "
                f"SDPA operators of a plain call ({', '.join(r['ours']) or 'none'})"
                for case, r in cases.items()]
    begin = time.monotonic()
    try:  # the data must be ready before the first variant
        data.wait(timeout=max(1.0, budget.left() - args.reserve - args.lra_overhead - 10))
        status = "ok" if data.returncode == 0 else f"failed (exit {data.returncode})"
    except subprocess.TimeoutExpired:
        stop(data)
        status = "stopped: no time left to train"
    data_log.close()
    log({"phase": "LRA data (waited for)", "status": status,
         "seconds": round(time.monotonic() - begin, 1)})
    ran = []
    for variant in args.lra_variants:
        seconds = min(args.lra_budget, budget.left() - args.reserve - args.lra_overhead)
        if status != "ok" or seconds < min(args.lra_budget, 20.0) * 0.5:
            log({"phase": f"LRA {variant}", "status": "did not fit in the budget"
                 if status == "ok" else "no data", "seconds": 0.0})
            continue
        log(run(f"LRA {variant}", lra_cmd(args, variant, seconds, out),
                out / f"listops-{variant}.log", seconds + args.lra_overhead))
        ran.append(variant)
    summary = {"device": args.device, "dry_run": args.dry_run, "budget_s": args.budget,
               "seconds": args.budget - budget.left(), "phases": phases, "targets": targets,
               "lra_table": merge_lra(out, ran),
               "failures": json.loads((out / "pytest.json").read_text())["failures"]
               if (out / "pytest.json").exists() else []}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    return summary


if __name__ == "__main__":
    main()
