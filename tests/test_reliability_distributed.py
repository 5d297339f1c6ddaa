"""Distributed training on this machine: 2 processes, gloo backend.

For every exported attention, DDP (and FSDP2 ``fully_shard``) training of the encoder for a
few SGD steps leaves parameters and buffers identical on both ranks and equal to
single-process training on the concatenated batch (fp32, tolerance ``ATOL``/``RTOL``: the
two sides sum the same terms in a different order). Buffers are not broadcast and each rank
seeds its global RNG differently, so random features (Performer's W) must be redrawn
identically from their own seed; the redraw test for attentions that redraw is listed in
``REDRAW_OPTIONS`` and runs only for those exported.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from reliability_cases import REDRAW_OPTIONS, attention_classes
from reliability_dist import WORLD, build, single_process, worker

ATOL, RTOL = 1e-5, 1e-4
NAMES = [c.__name__ for c in attention_classes()]

pytestmark = [pytest.mark.slow, pytest.mark.cpu_only]  # gloo process groups on the CPU


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(worker, args=(str(tmp / "init"), str(tmp), NAMES), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed workers did not finish in 300 s")
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers; tiny tensors
    try:
        return {name: single_process(name) for name in NAMES}
    finally:
        torch.set_num_threads(before)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", NAMES)
def test_ranks_hold_identical_parameters_and_buffers(ranks, name, mode):
    a, b = (r[f"{mode}/{name}"] for r in ranks)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{mode} {name}: {key} differs across ranks"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", NAMES)
def test_distributed_equals_single_process_on_the_whole_batch(ranks, reference, name, mode):
    got, ref = ranks[0][f"{mode}/{name}"], reference[name]
    initial = build(name).state_dict()
    assert _max_diff(ref, initial) > 1e-3, "training did not move the parameters"
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, key=key: f"{mode} {name} {key}: {m}")


@pytest.mark.parametrize("name", [n for n in NAMES if n in REDRAW_OPTIONS])
def test_random_features_redraw_identically_without_communication(ranks, reference, name):
    initial = {k: v for k, v in build(name).state_dict().items()
               if k not in dict(build(name).named_parameters())}
    final = [r[f"ddp/{name}"] for r in ranks]
    changed = [k for k in initial if not torch.equal(initial[k], final[0][k])]
    assert changed, f"{name}: no buffer changed although it redraws every step"
    for key in changed:
        assert torch.equal(final[0][key], final[1][key])
        assert torch.equal(final[0][key], reference[name][key])
