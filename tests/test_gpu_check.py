"""benchmarks/gpu_check.py and benchmarks/phases.py on the CPU: the budget and caps, the test
split, pytest's counts, the wheels step, the options, and the whole dry run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check, phases

pytestmark = pytest.mark.cpu_only  # drives subprocesses on the CPU


def test_partition_balances_file_sizes(tmp_path):
    sizes = [50, 40, 30, 20, 10, 10]
    files = []
    for i, size in enumerate(sizes):
        f = tmp_path / f"test_{i}.py"
        f.write_text("x" * size)
        files.append(f)
    groups = phases.partition(files, 3)
    assert sorted(p for g in groups for p in g) == sorted(files)
    totals = sorted(sum(p.stat().st_size for p in g) for g in groups)
    assert totals == [50, 50, 60]
    assert phases.partition(files[:2], 4) == [[files[0]], [files[1]]]  # no empty groups


def test_pytest_counts_from_closing_and_cut_off_logs():
    log = "....F.\nFAILED tests/a.py::t - boom\n= 1 failed, 5 passed, 2 skipped in 3.1s ="
    assert phases.pytest_counts(log) == {"failed": 1, "passed": 5, "skipped": 2}
    assert phases.pytest_counts("== 3 passed, 1 error in 2s ==") == {"passed": 3, "errors": 1}
    cut = "..F\nFAILED tests/a.py::t - boom\nFAILED tests/b.py::u - bang\nKeyboardInterrupt"
    assert phases.pytest_counts(cut) == {"failed": 2}


def test_budget_counts_down():
    now = [100.0]
    budget = phases.Budget(60.0, clock=lambda: now[0])
    now[0] += 25.0
    assert budget.left() == pytest.approx(35.0)


def test_a_phase_is_stopped_at_its_cap_and_skipped_without_time(tmp_path):
    quick = phases.run("quick", [sys.executable, "-c", "print('hi')"], tmp_path / "q.log", 60)
    assert quick["status"] == "ok" and (tmp_path / "q.log").read_text().strip() == "hi"
    slow = phases.run("slow", [sys.executable, "-c", "import time; time.sleep(60)"],
                      tmp_path / "s.log", 1.5)
    assert slow["status"].startswith("stopped at its cap") and slow["seconds"] < 20
    failing = phases.run("bad", [sys.executable, "-c", "raise SystemExit(3)"],
                         tmp_path / "b.log", 60)
    assert failing["status"] == "failed (exit 3)"
    assert phases.run("none", ["false"], tmp_path / "n.log", 0.5)["status"].startswith("skipped")


def test_wheels_are_installed_offline_from_the_folder_only(tmp_path, monkeypatch):
    assert "no wheels" in gpu_check.install_wheels(tmp_path / "absent", tmp_path, 60)["status"]
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "peer-1.0-py3-none-any.whl").write_bytes(b"")
    seen = {}
    monkeypatch.setattr(gpu_check, "run", lambda name, cmd, log, cap: seen.update(cmd=cmd)
                        or {"phase": name, "status": "ok"})
    gpu_check.install_wheels(tmp_path / "w", tmp_path, 60)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-index" in cmd and "--no-deps" in cmd
    assert cmd[cmd.index("--find-links") + 1] == str(tmp_path / "w")
    assert cmd[-1].endswith("peer-1.0-py3-none-any.whl")


def test_options_dry_run_and_output_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.delenv("DEVICE", raising=False)
    args = gpu_check.parse_args([])
    assert not args.dry_run and args.device == "cuda"
    assert args.out == gpu_check.RUNS / "gpu_check" and args.budget < 480  # well under 8 min
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args([])
    assert args.dry_run and args.device == "cpu" and args.out == tmp_path
    full = gpu_check.attention_cmd(argparse.Namespace(dry_run=False, device="cuda"), "bf16",
                                   tmp_path)
    lengths = full[full.index("--lengths") + 1: full.index("--repeats")]
    assert lengths == ["1024", "2048", "4096", "8192", "16384", "32768"]
    assert full[full.index("--dtype") + 1] == "bf16"


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """Every phase on tiny sizes on the CPU: the summary names each, the benchmarks wrote
    their JSON, and the LRA table has the paper's column."""
    summary = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "300"])
    names = [p["phase"] for p in summary["phases"]]
    assert names[:3] == ["wheels", "environment", "pytest"]
    assert {"attention bf16", "attention fp32", "sdpa kernels bf16", "LRA softmax",
            "LRA nystrom-64"} <= set(names)
    bad = [p for p in summary["phases"] if p["status"] not in ("ok",)
           and not p["status"].startswith("no wheels")]
    assert bad == []
    assert summary["phases"][2]["counts"].get("passed", 0) > 0
    for name in ("attention-bf16.json", "attention-fp32.json", "sdpa_kernels-bf16.json",
                 "env.json", "pytest.json", "summary.md", "listops/listops.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "attention-bf16.json").read_text())["config"]["dtype"] \
        == "bfloat16"
    assert "paper test acc" in (tmp_path / "listops" / "listops.md").read_text()
    assert all(Path(tmp_path / p).exists() for p in ("listops-softmax", "listops-nystrom-64"))


def test_fetch_wheels_pins_the_installed_peers(tmp_path):
    cmd = gpu_check.fetch_wheels_cmd(tmp_path)
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[cmd.index("--dest") + 1] == str(tmp_path)
    from importlib.metadata import version

    assert f"performer-pytorch=={version('performer-pytorch')}" in cmd
    assert any(c.startswith("flash-linear-attention") for c in cmd)
