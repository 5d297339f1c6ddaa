"""Peak CPU memory of one forward+backward step, measured in a fresh process.

    python -m benchmarks.memory benchmarks.contenders_softmax SoftmaxAttention 4096

Method (Linux): in a fresh subprocess, warm the contender up on a length-64 instance (thread
pools, lazy kernel set-up), build the length-n instance, read the resident set size
``VmRSS``, reset the kernel's peak counter (write ``5`` to ``/proc/self/clear_refs``, Linux
>= 4.0), run ONE ``step().sum().backward()`` and read the peak ``VmHWM``. Peak memory =
VmHWM − VmRSS before the step: what the forward and backward pass allocate on top of the
parameters and inputs.

The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every block
above 64 KiB with mmap and unmaps it on free, so RSS tracks live memory. With glibc's
default (a threshold that grows as blocks are freed) freed blocks stay in the heap and the
same step read 1.6-1.9x higher, varying from run to run. Checked with the calibration
probe below (``contenders()["allocate_mib"]``: a step that touches exactly n MiB reads n MiB,
after a warm-up that freed 64 MiB; ``tests/test_benchmarks.py``), and ``SoftmaxAttention`` at
n = 4096 reads 70 MiB, about the sum of its live activations and gradients. The threshold slows
allocation down, so timing runs elsewhere (``benchmarks/attention.py``), never here.

Without ``/proc`` (macOS) the worker falls back to a ``ru_maxrss`` delta, a lifetime peak:
the same number when the step is the process's largest moment, which it is for long inputs.

On CUDA (``cuda_peak_of_one_step``) no subprocess is needed: the allocator counts exactly. The
same protocol runs in the harness's process: warm up on a length-64 instance, build the
length-n one, then ``torch.cuda.max_memory_allocated`` during ONE step minus
``memory_allocated`` before it (``benchmarks/device.py``'s ``cuda_peak``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import ContenderFactory, Step
from benchmarks.device import DTYPES, cuda_peak, under_autocast

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_MARK = "@@RESULT "


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def fwd_bwd(step: Step) -> None:
    step().sum().backward()


def peak_of_one_step(step: Step) -> dict:
    """Run ``step`` forward+backward once; return its peak memory above the current RSS."""
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if before is not None and _reset_peak():
        method = "VmHWM - VmRSS, clear_refs reset, MALLOC_MMAP_THRESHOLD_=65536"
        fwd_bwd(step)
        peak = (_status_bytes("VmHWM") or 0) - before
    else:
        method = "ru_maxrss delta"
        before = _maxrss_bytes()
        fwd_bwd(step)
        peak = _maxrss_bytes() - before
    return {"peak_bytes": max(peak, 0), "memory_method": method,
            "first_step_s": time.perf_counter() - start}


def worker(module_name: str, name: str, n: int, dtype: str = "fp32") -> dict:
    factory = importlib.import_module(module_name).contenders()[name]
    cpu = torch.device("cpu")
    fwd_bwd(under_autocast(factory(64), cpu, dtype))  # warm-up on a small instance
    return peak_of_one_step(under_autocast(factory(n), cpu, dtype))


CUDA_METHOD = ("torch.cuda.max_memory_allocated during the step - memory_allocated before it "
               "(after a length-64 warm-up)")


def cuda_peak_of_one_step(factory: ContenderFactory, n: int, device: torch.device,
                          dtype: str = "fp32") -> dict:
    """Peak CUDA memory of one forward+backward of ``factory`` at length n on ``device``,
    above what was live before the step (parameters, inputs), as ``worker`` on the CPU."""
    fwd_bwd(under_autocast(factory(64, device=device), device, dtype))  # kernels, workspaces
    step = under_autocast(factory(n, device=device), device, dtype)
    start = time.perf_counter()
    with cuda_peak(device) as peak:
        fwd_bwd(step)
    return {"peak_bytes": peak["peak_bytes"], "memory_method": CUDA_METHOD,
            "first_step_s": time.perf_counter() - start}


def contenders() -> dict[str, Callable[[int], Step]]:
    """Calibration probe: ``allocate_mib`` at "length" n touches exactly n MiB in its step."""

    def allocate_mib(n: int) -> Step:
        x = torch.ones(1, requires_grad=True)

        def step() -> torch.Tensor:
            buffer = torch.empty(n * 2**18).fill_(1.0)  # n MiB of fp32, every page touched
            return buffer.sum() * x  # (1,)

        return step

    return {"allocate_mib": allocate_mib}


def measure_memory(module_name: str, name: str, n: int, *, threads: int | None = None,
                   timeout: float = 300.0, dtype: str = "fp32") -> dict:
    """Peak CPU memory of contender ``name`` from ``module_name`` at length n, in a subprocess
    (its forward under autocast for ``dtype`` bf16 / fp16).

    Failures (exception, OOM kill, timeout) come back as ``{"error": reason}``.
    """
    cmd = [sys.executable, "-m", "benchmarks.memory", module_name, name, str(n)]
    if threads:
        cmd += ["--threads", str(threads)]
    if dtype != "fp32":
        cmd += ["--dtype", dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, **MALLOC_ENV))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"error": tail[:200]}


def main() -> None:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads the variable at start-up only: restart this process with it set
        argv = [sys.executable, "-m", "benchmarks.memory", *sys.argv[1:]]
        os.execve(sys.executable, argv, dict(os.environ, **MALLOC_ENV))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("module")
    p.add_argument("name")
    p.add_argument("n", type=int)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(_MARK + json.dumps(worker(args.module, args.name, args.n, args.dtype)))


if __name__ == "__main__":
    main()
