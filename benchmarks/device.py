"""Device and dtype for the benchmarks: the options, the clock, peak memory, and what the JSON says.

Every timing benchmark takes ``--device`` (default ``cpu``; ``cuda``, ``cuda:1``, ...) and
``--dtype`` (``fp32`` default, ``bf16``, ``fp16``). What they mean here:

- dtype: the forward pass runs under ``torch.autocast(device, dtype)`` (mixed precision, as
  GPUs train: parameters and inputs stay fp32, autocast runs matmuls and SDPA in the low
  dtype); ``fp32`` is no autocast. The backward pass runs outside autocast, as usual.
- time, CUDA: ``torch.cuda.synchronize()``, then a pair of
  ``torch.cuda.Event(enable_timing=True)`` recorded around the call, then the end event is
  waited for: the GPU time of the call, not the time to enqueue it. CPU: wall clock
  (``time.perf_counter``), as before.
- peak memory, CUDA: ``torch.cuda.reset_peak_memory_stats`` after a synchronize, then
  ``max_memory_allocated − memory_allocated`` before the step: what the step allocates on
  top of what was live (the CPU benchmarks keep their RSS method, ``benchmarks/memory.py``).
- the JSON names the device (``torch.cuda.get_device_name``, or the CPU model from
  ``/proc/cpuinfo`` / ``platform.processor()``) and the dtype (``device_info``).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.common import Step

#: ``--dtype`` names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
#: torch dtypes -> their ``--dtype`` names.
SHORT_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def parse_device(text: str) -> torch.device:
    """``--device`` value -> ``torch.device``; CUDA asked for where there is none is an error
    naming the problem (not a failure deep inside the first kernel)."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"expected a torch device (cpu, cuda, cuda:1), got "
                                         f"{text!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch.cuda.is_available() is False here")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    return device


def add_device_options(
    parser: argparse.ArgumentParser, *, dtypes: tuple[str, ...] = tuple(DTYPES)
) -> None:
    """``--device`` (a ``torch.device``, default cpu) and ``--dtype`` (a name in ``DTYPES``,
    default fp32; ``dtypes`` narrows the choice)."""
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"),
                        help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=dtypes, default="fp32",
                        help="fp32 (default), or the autocast dtype of the forward pass")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()`` / machine."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_info(device: torch.device, dtype: str) -> dict[str, Any]:
    """What a benchmark's JSON records about where and in what it ran."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "autocast": dtype != "fp32",
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``; no autocast for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def under_autocast(step: Step, device: torch.device, dtype: str) -> Step:
    """``step`` whose forward runs under ``autocast(device, dtype)`` (``step`` itself for
    fp32)."""
    if dtype == "fp32":
        return step

    def wrapped() -> torch.Tensor:
        with autocast(device, dtype):
            return step()

    return wrapped


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of GPU time ``fn()`` takes on ``device``: CUDA events around it, after a
    synchronize (so earlier work is not counted), and the end event waited for."""
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in ms


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """``time(fn) -> seconds``: CUDA events on CUDA (``cuda_time``), wall clock otherwise."""
    if device.type == "cuda":
        return lambda fn: cuda_time(fn, device)

    def wall(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return wall


@contextlib.contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict[str, int]]:
    """``with cuda_peak(device) as peak: ...``; afterwards ``peak["peak_bytes"]`` holds
    ``max_memory_allocated`` during the block minus ``memory_allocated`` before it."""
    if device.type != "cuda":
        raise ValueError(f"cuda_peak: expected a CUDA device, got {device}")
    result: dict[str, int] = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result["peak_bytes"] = max(torch.cuda.max_memory_allocated(device) - before, 0)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error (its own class, or a RuntimeError saying so)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom) or "out of memory" in str(error).lower()
