"""The ListOps job's presets (data, model, training) and its cache of generated splits.

``full`` is the Nyströmformer paper's LRA ListOps setup (Xiong et al. 2021, arXiv 2102.03902;
its code ``LRA/code/lra_config.py`` and ``run_tasks.py``):

- data: lengths 500–2000, depth ≤ 10, ≤ 10 arguments, 96k / 2k / 2k (``LRA_CONFIG``);
- model: 2 layers, d_model 64, 2 heads × 32, FFN 128, learned positions, mean pooling,
  dropout and attention dropout 0.1 (``LRA_MODEL``);
- training: batch 32, 5000 steps, AdamW (lr 1e-4, eps 1e-6, no weight decay), OneCycleLR
  with 1000 warm-up steps and linear decay, no gradient clipping; validation every 50 steps,
  the test scored with the best validation checkpoint;
- attention: softmax, nystrom-64 (conv 35), performer-256 with the ReLU kernel.

Their runs used fp16 mixed precision (``--dtype fp16``; ``bf16`` on GPUs that have it is the
usual choice). Their dev score is the mean over 62 batches of 32; ours is the whole 2000.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..outputs import RUNS
from .config import TrainConfig
from .data import LRA_CONFIG, ListOpsConfig, Split, make_splits, make_splits_sharded
from .model import LRA_MODEL, ModelConfig


@dataclass(frozen=True)
class Preset:
    """Data, model and training settings of one mode; ``shards`` > 0: the data is drawn by
    ``make_splits_sharded`` in that many streams (LRA's sizes), else by ``make_splits``."""

    data: ListOpsConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    shards: int = 0


LRA_TRAIN = TrainConfig(
    steps=5000, batch_size=32, lr=1e-4, warmup=1000, schedule="onecycle-linear",
    weight_decay=0.0, adam_eps=1e-6, clip_norm=None, eval_every=50,
)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        ListOpsConfig(min_length=8, max_length=64, max_depth=4, max_args=4, n_train=400,
                      n_valid=100, n_test=200),
        train=TrainConfig(steps=12, batch_size=16, warmup=3),
    ),
    "default": Preset(ListOpsConfig()),
    "full": Preset(LRA_CONFIG, LRA_MODEL, LRA_TRAIN, shards=32),
}

CACHE = RUNS / "cache"  # generated splits, keyed by settings and seed
DATA_VERSION = 1  # bump when the generator changes, so cached splits are not reused


def cache_path(config: ListOpsConfig, seed: int, cache: Path, shards: int = 0) -> Path:
    """Where the splits of (config, seed[, shards]) are cached."""
    parts: list[object] = [DATA_VERSION, config.to_dict(), seed]
    if shards:
        parts.append({"shards": shards})
    key = json.dumps(parts, sort_keys=True)
    return cache / f"listops-data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def load_or_make_splits(config: ListOpsConfig, seed: int, cache: Path | None, *,
                        shards: int = 0, workers: int | None = None) -> dict[str, Split]:
    """``make_splits(config, seed=seed)`` (``make_splits_sharded`` with ``shards``, on
    ``workers`` processes, default one per core), cached as a ``.pt`` file in ``cache`` when
    given (tokens stored as uint8: the vocabulary has 16 ids)."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1

    def make() -> dict[str, Split]:
        if shards:
            return make_splits_sharded(config, seed=seed, shards=shards, workers=workers)
        return make_splits(config, seed=seed)

    if cache is None:
        return make()
    path = cache_path(config, seed, cache, shards)
    if path.exists():
        stored = torch.load(path, weights_only=True)
        return {name: Split(tensors["tokens"].long(), tensors["lengths"], tensors["labels"])
                for name, tensors in stored.items()}
    splits = make()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({name: {"tokens": split.tokens.to(torch.uint8), "lengths": split.lengths,
                       "labels": split.labels} for name, split in splits.items()}, tmp)
    tmp.replace(path)  # a cache file is complete or absent (another run may read it)
    return splits
