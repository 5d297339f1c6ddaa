"""The benchmark harness's memory measurement reads a known allocation correctly."""

from __future__ import annotations

import pytest

from benchmarks.memory import measure_memory


@pytest.mark.slow
@pytest.mark.parametrize("mib", [16, 48])
def test_peak_memory_of_a_known_allocation(mib):
    # the worker first runs the probe at "length" 64 (64 MiB, freed) then measures mib MiB:
    # freed memory kept by the allocator would make this read far less than mib
    result = measure_memory("benchmarks.memory", "allocate_mib", mib, timeout=120)
    assert "error" not in result, result
    assert mib - 1 <= result["peak_bytes"] / 2**20 <= mib + 4


def test_optional_contender_modules_are_skipped_and_names_unique(monkeypatch):
    import types

    from benchmarks import attention

    monkeypatch.setattr(attention, "MODULES",
                        ("benchmarks.contenders_softmax", "benchmarks.contenders_absent"))
    modules = attention.load_modules()
    assert [m.__name__ for m in modules] == ["benchmarks.contenders_softmax"]
    table = attention.all_contenders(modules)
    assert {"SoftmaxAttention", "nn.MultiheadAttention", "F.sdpa"} <= set(table)
    twin = types.ModuleType("benchmarks.twin")
    twin.contenders = lambda: {"SoftmaxAttention": None}
    with pytest.raises(ValueError, match="'SoftmaxAttention' defined by"):
        attention.all_contenders([*modules, twin])


def test_target_verdict():
    from benchmarks.attention import check_target

    def res(*times):
        return {n: {"times_s": [t, 2 * t]} for n, t in zip((512, 1024), times, strict=True)}

    met = check_target({"SoftmaxAttention": res(1.0, 2.0), "nn.MultiheadAttention": res(1.0, 2.0)},
                       [512, 1024])
    assert met is not None and ": met (512: 1.00x, 1024: 1.00x)" in met
    missed = check_target({"SoftmaxAttention": res(1.0, 2.2),
                           "nn.MultiheadAttention": res(1.0, 2.0)}, [512, 1024])
    assert missed is not None and "MISSED" in missed and "1024: 1.10x" in missed
