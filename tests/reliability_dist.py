"""Workers for tests/test_reliability_distributed.py (spawned: must be importable by name).

Each rank trains every attention's encoder for a few SGD steps on its half of one global
batch, under DDP and under FSDP2 ``fully_shard``, and saves the final states for the parent
test to compare across ranks and against single-process training on the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from reliability_cases import REDRAW_OPTIONS, attention_classes, attention_factory, encoder_config
from reliability_cases import padding_mask as _padding_mask
from torch import Tensor, nn

from transformer_zoo import Encoder

STEPS, LR, WORLD = 3, 0.05, 2
BATCH, SEQ, D_MODEL = 4, 6, 16


def data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    mask = _padding_mask(BATCH, SEQ, g)
    y = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    return x, mask, y


def build(name: str) -> Encoder:
    """Same weights on every rank (seed 0); random-feature redraw every step where offered."""
    cls = {c.__name__: c for c in attention_classes()}[name]
    torch.manual_seed(0)
    factory = attention_factory(cls, **REDRAW_OPTIONS.get(name, {}))
    return Encoder(encoder_config(cls, None, attention=factory)).train()


def loss_fn(out: Tensor, y: Tensor, mask: Tensor, total: int) -> Tensor:
    """Sum of squared errors over real tokens / the global count (a fixed constant)."""
    return ((out - y).square() * mask[..., None]).sum() / total


def train(model: nn.Module, params: list[nn.Parameter], part: slice, scale: float) -> None:
    x, mask, y = data()
    total = int(mask.sum()) * D_MODEL
    opt = torch.optim.SGD(params, lr=LR)
    for _ in range(STEPS):
        out = model(x[part], mask=mask[part])
        (scale * loss_fn(out, y[part], mask[part], total)).backward()
        opt.step()
        opt.zero_grad()


def single_process(name: str, seed: int = 999) -> dict[str, Tensor]:
    """Reference: one process, the whole batch."""
    model = build(name)
    torch.manual_seed(seed)  # the global RNG differs from every rank's
    train(model, list(model.parameters()), slice(None), 1.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full(v: Tensor) -> Tensor:
    full = getattr(v, "full_tensor", None)
    return (full() if callable(full) else v).detach().clone()


def worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results: dict[str, dict[str, Tensor]] = {}
    for name in names:
        # DDP; buffers are NOT broadcast, and each rank's global RNG differs, so random
        # features must be redrawn identically from their own seed with no communication.
        model = build(name)
        torch.manual_seed(1000 + rank)
        ddp = DDP(model, broadcast_buffers=False)
        train(ddp, list(ddp.parameters()), part, float(WORLD))
        results[f"ddp/{name}"] = {k: _full(v) for k, v in model.state_dict().items()}
        # FSDP2: parameters sharded over the two ranks (gradients averaged like DDP)
        model = build(name)
        torch.manual_seed(1000 + rank)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, list(model.parameters()), part, float(WORLD))
        results[f"fsdp/{name}"] = {k: _full(v) for k, v in model.state_dict().items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
