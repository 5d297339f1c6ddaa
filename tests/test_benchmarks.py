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
