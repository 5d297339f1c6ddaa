"""Linearize a pretrained model: swap in Performer / Nyström attention, then win its quality back.

Stage 1, attention transfer (Zhang et al. 2024, LoLCATs, arXiv 2410.10254; Hedgehog, Zhang et
al. 2024, arXiv 2402.04347): only the student attentions' own parameters θ (learnable feature
maps) train, every layer against the model's own softmax attention on the same q, k, v,

    L₁(θ) = (1/L) Σ_l ‖Kernel_l(q_l, k_l, v_l; θ_l) − S_l‖² / ‖S_l‖²,  S_l = softmax(q_l k_lᵀ/√d)v_l
            (+ weights_loss · Hedgehog's cross-entropy between the two attention weights)

in one forward: each layer passes the teacher's output on, so layer l sees the original
model's inputs. All layers at once, or one layer after the other (``layerwise``: the forward
stops after the layer being trained).

Stage 2, fine-tuning (optional): chosen weights (default: every converted attention module's)
of the converted model against the original model's final hidden states,

    L₂ = ‖h_converted − h_original‖² / ‖h_original‖²   (real tokens only)
         (+ pooled_cosine · mean_b(1 − cos(pool(h_converted), pool(h_original))), optional)

where h_original is the same model with the softmax kernel under ``no_grad``, its trained
tensors read from a snapshot taken before stage 2 (so the target never drifts; no second copy
of the model). A kernel without parameters (Performer's FAVOR+, Nyström without convolution)
skips stage 1; stage 2 is what it gets. Shapes: whatever the model takes; errors are defined in
``linearize.report``.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from transformer_zoo.linearize.batches import (
    Stream,
)
from transformer_zoo.linearize.loop import TrainLoop
from transformer_zoo.linearize.losses import finetune_loss, transfer_loss
from transformer_zoo.linearize.report import LinearizeReport
from transformer_zoo.linearize.stages import (
    AttentionTransfer,
    Finetune,
    Trainable,
)
from transformer_zoo.linearize.teacher_student import (
    AttentionSpec,
    Conversion,
    convert,
)


# -- selection --------------------------------------------------------------------------------
def _stage2_parameters(model: nn.Module, conversion: Conversion, trainable: Trainable
                       ) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if trainable is None:
        ids = {id(p) for m in conversion.modules for p in m.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif callable(trainable):
        chosen = [(n, p) for n, p in named if trainable(n, p)]
    else:
        patterns = [trainable] if isinstance(trainable, str) else list(trainable)
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not chosen:
        raise ValueError(f"Finetune.trainable={trainable!r} selects no parameter of "
                         f"{type(model).__name__} (names look like {named[0][0]!r})")
    return chosen


# -- the loop ---------------------------------------------------------------------------------
#: ``linearize``'s default stage 1 (frozen, so sharing it is safe).
DEFAULT_TRANSFER = AttentionTransfer()


def linearize(
    model: nn.Module,
    attention: AttentionSpec,
    batches: Iterable[Any],
    *,
    stage1: AttentionTransfer | None = DEFAULT_TRANSFER,
    stage2: Finetune | None = None,
    stage2_batches: Iterable[Any] | None = None,
    eval_batches: Sequence[Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    monitor: Callable[[nn.Module], Any] | None = None,
    monitor_every: int = 0,
) -> tuple[nn.Module, LinearizeReport]:
    """Convert ``model``'s softmax attention to ``attention`` (in place) and train it back.

    Args:
        model: an HF 5.x ``PreTrainedModel``, a model of our blocks (``Encoder``) or a model
            with ``nn.MultiheadAttention`` (see ``convert``). Training follows its device.
        attention: a kernel name, ``HFKernel``, or ``MultiHeadAttention`` subclass / factory.
        batches: the user's unlabeled batches: a dict (``model(**batch)``: HF's
            ``input_ids`` / ``attention_mask``, our ``x`` / ``mask``), a tuple
            (``model(*batch)``) or a tensor (``model(batch)``). Re-iterated when exhausted if
            it can be (a list, a DataLoader); a one-pass iterator ends the stages early.
        stage1: ``AttentionTransfer`` or None. Skipped (and said so in the report) when the
            student has no parameters of its own.
        stage2: ``Finetune`` or None (default: no fine-tuning).
        stage2_batches: stage 2's batches, if not ``batches`` (e.g. short texts for the
            cheap attention transfer, full-length ones for fine-tuning); same forms.
        eval_batches: where the report's errors are measured (default: the first batch).
        seed: seeds the students' initialisation (random features) and training; torch's
            global generator is left as it was.
        progress: draw text progress bars on stderr.
        monitor: ``monitor(model) -> value``, called (eval mode, ``no_grad``, converted model)
            at the start of each stage and every ``monitor_every`` steps; kept in
            ``report.curve``, its time not counted.

    Returns ``(model, report)``; the model is in its original train/eval mode, with the
    ``requires_grad`` flags it had, and saves / loads like any model (reload: ``convert`` a
    fresh original model, then ``load_state_dict``). Training runs in eval mode (no dropout).
    """
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise TypeError(f"batches: expected an iterable of batches (a list of dicts, tuples or "
                        f"tensors), got {type(batches).__name__}; wrap one batch in a list")
    if stage2_batches is not None and (isinstance(stage2_batches, Tensor)
                                       or not isinstance(stage2_batches, Iterable)):
        raise TypeError(f"stage2_batches: expected an iterable of batches or None, got "
                        f"{type(stage2_batches).__name__}")
    if stage1 is not None and not isinstance(stage1, AttentionTransfer):
        raise TypeError(f"stage1: expected AttentionTransfer or None, got {stage1!r}")
    if stage2 is not None and not isinstance(stage2, Finetune):
        raise TypeError(f"stage2: expected Finetune or None, got {stage2!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    if monitor is not None and not callable(monitor):
        raise TypeError(f"monitor: expected a callable or None, got {monitor!r}")
    if isinstance(monitor_every, bool) or not isinstance(monitor_every, int) or monitor_every < 0:
        raise ValueError(f"monitor_every: expected an int >= 0, got {monitor_every!r}")
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise TypeError(f"model: expected an nn.Module with parameters, got "
                        f"{type(model).__name__}")
    hf_cache = hasattr(model, "config") and "use_cache" in inspect.signature(
        model.forward).parameters
    if hf_cache:  # training needs no decoding cache (and a recurrent one bypasses attend)
        batches = _without_cache(batches)
        stage2_batches = None if stage2_batches is None else _without_cache(stage2_batches)
        eval_batches = None if eval_batches is None else _without_cache(eval_batches)
    stream = Stream(batches)
    first = stream.peek()
    if first is None:
        raise ValueError("batches: is empty")
    stream2 = stream if stage2_batches is None else Stream(stage2_batches)
    if stream2.peek() is None:
        raise ValueError("stage2_batches: is empty")
    eval_batches = [first] if eval_batches is None else list(eval_batches)
    if not eval_batches:
        raise ValueError("eval_batches: is empty")
    device = next(model.parameters()).device
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        conversion = convert(model, attention)
        report = LinearizeReport(type(conversion.students[0]).__name__, conversion.paths,
                                 seed=seed)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            loop = TrainLoop(model, conversion, stream, eval_batches, progress, monitor,
                         monitor_every, report)
            loop.evaluate("before")
            _stage1(model, conversion, loop, stage1, report)
            loop.stream = stream2
            _stage2(model, conversion, loop, stage2, report)
        finally:
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), True))
            model.train(was_training)
    return model, report


class _without_cache:  # noqa: N801 (an iterable adapter, used like a function)
    """Dict batches get ``use_cache=False`` (unless they say otherwise) for HF models."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield {"use_cache": False} | dict(batch) if isinstance(batch, Mapping) else batch


def _stage1(model: nn.Module, conversion: Conversion, loop: TrainLoop,
            config: AttentionTransfer | None, report: LinearizeReport) -> None:
    own = conversion.new_parameters()
    if config is None:
        report.stage1.skipped = "not requested (stage1=None)"
        return
    if not any(own):
        report.stage1.skipped = (f"{report.attention} has no parameters of its own (nothing "
                                 "to transfer); stage 2 is what it gets")
        return
    report.stage1.trained = [name for params in own for name, _ in params]
    for params in own:
        for _, p in params:
            p.requires_grad_(True)
    if config.layerwise:
        layers = [i for i, params in enumerate(own) if params]
        for done, layer in enumerate(layers):
            left = None if config.seconds is None else (
                (config.seconds - report.stage1.seconds) / (len(layers) - done))
            loop.train(1, f"stage 1, layer {layer}", [p for _, p in own[layer]],
                       transfer_loss(model, conversion, [layer], config.weights_loss),
                       config.steps, left, config.lr, report.stage1, first_step=done,
                       schedule=config.schedule, warmup=config.warmup)
    else:
        layers = list(range(len(own)))
        loop.train(1, "stage 1", [p for params in own for _, p in params],
                   transfer_loss(model, conversion, layers, config.weights_loss),
                   config.steps, config.seconds, config.lr, report.stage1,
                   schedule=config.schedule, warmup=config.warmup)
    for params in own:
        for _, p in params:
            p.requires_grad_(False)
    loop.evaluate("stage1")


def _stage2(model: nn.Module, conversion: Conversion, loop: TrainLoop, config: Finetune | None,
            report: LinearizeReport) -> None:
    if config is None:
        report.stage2.skipped = "not requested (stage2=None)"
        return
    chosen = _stage2_parameters(model, conversion, config.trainable)
    report.stage2.trained = [name for name, _ in chosen]
    original = {name: p.detach().clone() for name, p in chosen}  # the teacher's snapshot
    for _, p in chosen:
        p.requires_grad_(True)
    loop.train(2, "stage 2", [p for _, p in chosen],
               finetune_loss(model, conversion, original, config.pooled_cosine),
               config.steps, config.seconds, config.lr, report.stage2,
               schedule=config.schedule, warmup=config.warmup)
    for _, p in chosen:
        p.requires_grad_(False)
    loop.evaluate("stage2")
