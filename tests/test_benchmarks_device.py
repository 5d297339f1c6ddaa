"""benchmarks/device.py and the device options of the benchmarks, checked on the CPU.

The CUDA paths (events, peak memory) run here against fakes of the ``torch.cuda`` functions
they call, so their protocol (synchronize, then record; wait for the end event; reset the
peak, subtract the baseline) is checked without a GPU; the real thing runs in
``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import pytest
import torch

from benchmarks import device as bd

pytestmark = pytest.mark.cpu_only  # the harness's CPU paths, and fakes of torch.cuda

CUDA = torch.device("cuda")


class FakeCuda:
    """The ``torch.cuda`` calls ``benchmarks.device`` makes, logged in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, elapsed_ms: float = 250.0) -> None:
        self.log: list[str] = []
        self.allocated, self.peak = 100, 100
        log = self.log

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                self.recorded = False

            def record(self) -> None:
                log.append("record")
                self.recorded = True

            def synchronize(self) -> None:
                log.append("event.synchronize")

            def elapsed_time(self, end: Event) -> float:
                assert self.recorded and end.recorded
                log.append("elapsed_time")
                return elapsed_ms

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: log.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: self.peak)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU 80GB")

    def _reset(self, d=None) -> None:
        self.log.append("reset_peak")
        self.peak = self.allocated

    def allocate(self, nbytes: int) -> None:
        """A block of ``nbytes`` allocated and freed: the peak rises, allocated does not."""
        self.peak = max(self.peak, self.allocated + nbytes)


def test_cuda_time_synchronizes_before_the_start_event_and_waits_for_the_end(monkeypatch):
    fake = FakeCuda(monkeypatch, elapsed_ms=250.0)
    seconds = bd.cuda_time(lambda: fake.log.append("fn"), CUDA)
    assert seconds == pytest.approx(0.25)  # elapsed_time is in ms
    assert fake.log == ["synchronize", "record", "fn", "record", "event.synchronize",
                        "elapsed_time"]
    assert bd.timer(CUDA)(lambda: None) == pytest.approx(0.25)


def test_wall_clock_timer_on_the_cpu():
    seconds = bd.timer(torch.device("cpu"))(lambda: time.sleep(0.02))
    assert 0.02 <= seconds < 1.0


def test_cuda_peak_is_the_step_peak_above_what_was_live(monkeypatch):
    fake = FakeCuda(monkeypatch)
    fake.allocate(10_000)  # before the block: must not count
    with bd.cuda_peak(CUDA) as peak:
        fake.allocate(300)
    assert peak["peak_bytes"] == 300
    assert fake.log[:2] == ["synchronize", "reset_peak"] and fake.log[-1] == "synchronize"
    with pytest.raises(ValueError, match="expected a CUDA device"):
        with bd.cuda_peak(torch.device("cpu")):
            pass


def test_cuda_memory_protocol_warms_up_then_measures_one_step_at_n(monkeypatch):
    from benchmarks import memory

    fake = FakeCuda(monkeypatch)
    built = []

    def factory(n, device=None):
        built.append((n, device))
        return lambda: (fake.allocate(1000 * n), torch.ones(1, requires_grad=True).sum())[1]

    result = memory.cuda_peak_of_one_step(factory, 8, CUDA)
    assert built == [(64, CUDA), (8, CUDA)]  # a length-64 warm-up, then the length-n instance
    assert result["peak_bytes"] == 8000 and "max_memory_allocated" in result["memory_method"]


def test_device_info_names_the_device_and_the_dtype(monkeypatch):
    cpu = bd.device_info(torch.device("cpu"), "bf16")
    assert cpu["device"] == "cpu" and cpu["dtype"] == "bfloat16" and cpu["autocast"]
    assert cpu["device_name"] == bd.cpu_model() != ""
    FakeCuda(monkeypatch)
    gpu = bd.device_info(CUDA, "fp32")
    assert gpu["device_name"] == "Fake GPU 80GB" and gpu["dtype"] == "float32"
    assert not gpu["autocast"] and "cuda" in gpu


def test_device_option_rejects_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    bd.add_device_options(parser)
    args = parser.parse_args([])
    assert args.device == torch.device("cpu") and args.dtype == "fp32"
    assert parser.parse_args(["--device", "cpu", "--dtype", "fp16"]).dtype == "fp16"
    for bad in (["--device", "cuda"], ["--device", "gpu0"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_under_autocast_runs_the_forward_in_the_dtype():
    w = torch.randn(4, 4)
    step = lambda: torch.ones(2, 4) @ w  # noqa: E731
    cpu = torch.device("cpu")
    assert bd.under_autocast(step, cpu, "fp32") is step
    assert bd.under_autocast(step, cpu, "bf16")().dtype == torch.bfloat16
    assert bd.under_autocast(step, cpu, "fp16")().dtype == torch.float16
    assert step().dtype == torch.float32  # outside the wrapper: no autocast left on


def test_round_robin_drops_a_contender_that_fails_mid_run_and_uses_the_clock():
    """A step that raises (CUDA out of memory beside the others) is dropped from later rounds,
    its error kept; the others go on, timed by ``clock``; the bar still counts every step."""
    from benchmarks import attention

    calls = {"n": 0}

    def flaky(n, device=None):
        def step():
            calls["n"] += 1
            if calls["n"] > 2:  # warm-up and the first timed round pass
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return torch.ones(1, requires_grad=True).sum()
        return step

    fine = lambda n, device=None: (lambda: torch.ones(1, requires_grad=True).sum())  # noqa: E731
    ticks = []
    out = attention.time_round_robin({"flaky": flaky, "fine": fine}, 8, 3,
                                     lambda: ticks.append(1), clock=lambda fn: (fn(), 0.5)[1])
    assert out["fine"]["times_s"] == [0.5, 0.5, 0.5] and out["fine"]["warmup_s"] == 0.5
    assert out["flaky"]["times_s"] == [0.5] and "out of memory" in out["flaky"]["error"]
    assert len(ticks) == 2 * 3


def test_attention_benchmark_records_device_and_dtype_and_lists_unavailable(tmp_path):
    """A tiny real run in bf16 on the CPU: the JSON names the device and dtype, the Triton
    contender is listed as not run (with the reason), the others are timed."""
    from benchmarks import attention
    from benchmarks.contenders_fla import NAME

    report = attention.main(["--lengths", "16", "--repeats", "1", "--min-seconds", "0",
                             "--no-memory", "--error-lengths", "--dtype", "bf16",
                             "--contenders", "SoftmaxAttention", "F.sdpa",
                             "--out", str(tmp_path / "a.json")])
    c = report["config"]
    assert c["device"] == "cpu" and c["dtype"] == "bfloat16" and c["device_name"]
    assert c["clock"] == "wall clock"
    assert "CUDA only" in report["unavailable"][NAME]
    assert report["results"]["F.sdpa"]["16"]["times_s"]
    assert "bf16 autocast, CPU" in (tmp_path / "a.md").read_text()


def test_error_hooks_take_device_and_dtype():
    from benchmarks import contenders_softmax

    fp32 = contenders_softmax.errors(32)
    bf16 = contenders_softmax.errors(32, torch.device("cpu"), torch.bfloat16)
    assert set(fp32) == {"softmax_attention (fp32)"} and set(bf16) == {"softmax_attention (bf16)"}
    assert fp32["softmax_attention (fp32)"] < 1e-5 < bf16["softmax_attention (bf16)"] < 3e-2


def test_more_targets_judge_the_scan_speed_and_linear_memory():
    from benchmarks.attention_report import FAVOR_SCAN, FLA_SCAN, more_targets

    def res(times, peaks):
        return {n: {"times_s": [t], "peak_bytes": p}
                for n, t, p in zip((1024, 8192), times, peaks, strict=True)}

    results = {FAVOR_SCAN: res((1.0, 8.0), (1.0, 8.0)), FLA_SCAN: res((1.0, 4.0), (1, 1)),
               "SoftmaxAttention": res((1.0, 5.0), (1.0, 64.0)),
               "NystromAttention": res((2.0, 4.0), (1.0, 80.0))}
    verdicts = "\n".join(more_targets(results, [1024, 8192]))
    assert "chunked kernel: MISSED (1024: 1.00x, 8192: 2.00x)" in verdicts
    assert "NystromAttention faster than SoftmaxAttention from n = 8192: met (8192: 0.80x)" \
        in verdicts
    assert f"{FAVOR_SCAN} peak memory linear in n: met" in verdicts
    assert "NystromAttention peak memory linear in n: MISSED" in verdicts


def test_sdpa_probe_names_the_kernel_of_ours_and_of_a_plain_call():
    from benchmarks import sdpa_kernels

    cases = sdpa_kernels.probe(32, torch.device("cpu"), "fp32")
    assert set(cases) == set(sdpa_kernels.CASES)
    for r in cases.values():
        assert r["same"] and any("scaled_dot_product" in op for op in r["plain sdpa"])
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    explicit = lambda: torch.softmax(q @ q.mT, -1) @ q  # noqa: E731
    assert sdpa_kernels.attention_ops(explicit) == []  # it tells SDPA from no SDPA
