"""Timed phases for ``benchmarks/gpu_check.py``: subprocesses with a cap cut from one budget.

A phase that reaches its cap gets SIGINT (pytest and Python then print what they have), then
is killed if it does not stop within 15 s. Also: test files split into groups of about equal
size, and pytest's counts read back from a log (also a cut-off one).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Budget:
    """Seconds left of ``total`` since construction (``clock`` for tests)."""

    total: float
    clock: Any = time.monotonic
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def left(self) -> float:
        return self.total - (self.clock() - self.start)


def partition(files: list[Path], workers: int) -> list[list[Path]]:
    """Test files into ``workers`` groups of about equal size (largest first, greedy)."""
    groups: list[list[Path]] = [[] for _ in range(max(1, workers))]
    sizes = [0] * len(groups)
    for f in sorted(files, key=lambda p: (-p.stat().st_size, p.name)):
        i = sizes.index(min(sizes))
        groups[i].append(f)
        sizes[i] += f.stat().st_size
    return [sorted(g) for g in groups if g]


def pytest_counts(log: str) -> dict[str, int]:
    """``{"passed": 3, "failed": 1, ...}`` from pytest's closing line (the last that has
    counts), and the ``FAILED`` / ``ERROR`` lines' count when it was cut off."""
    counts: dict[str, int] = {}
    for line in log.splitlines()[::-1]:
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                           line)
        if found:
            for number, word in found:
                counts["errors" if word.startswith("error") else word] = int(number)
            break
    if not counts:
        counts["failed"] = sum(1 for ln in log.splitlines() if ln.startswith("FAILED "))
    return counts


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (pytest and Python print what they have), then kill if it does not stop."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, Any]:
    handle = log.open("w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                            env=env), handle


def run(name: str, cmd: list[str], log: Path, cap: float) -> dict[str, Any]:
    """Run ``cmd`` (output into ``log``) for at most ``cap`` seconds; its record."""
    record: dict[str, Any] = {"phase": name, "cmd": cmd, "log": log.name}
    if cap <= 1:
        return dict(record, status="skipped: no time left", seconds=0.0)
    begin = time.monotonic()
    proc, handle = start(cmd, log)
    try:
        proc.wait(timeout=cap)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        stop(proc)
        status = f"stopped at its cap of {cap:.0f} s"
    finally:
        handle.close()
    return dict(record, status=status, rc=proc.returncode,
                seconds=round(time.monotonic() - begin, 1))
