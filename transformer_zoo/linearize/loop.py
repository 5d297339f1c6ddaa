"""The training loop of ``linearize``'s two stages and its evaluation of the report's errors.

Shapes: whatever the model takes; errors are defined in ``linearize.report``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from transformer_zoo.linearize.batches import (
    Stream,
    call,
    hidden,
    hidden_terms,
    real_rows,
    to_device,
)
from transformer_zoo.linearize.report import Bar, LinearizeReport, StageReport
from transformer_zoo.linearize.stages import Schedule, lr_factor
from transformer_zoo.linearize.teacher_student import Conversion, Tap


class TrainLoop:
    """The training loop both stages share: AdamW steps on a loss over a batch stream within
    a step and time budget (learning-rate schedule, progress bar, monitor curve), and the
    report's attention / hidden-state errors on the evaluation batches."""

    def __init__(self, model: nn.Module, conversion: Conversion, stream: Stream,
                 eval_batches: list[Any], progress: bool,
                 monitor: Callable[[nn.Module], Any] | None, monitor_every: int,
                 report: LinearizeReport) -> None:
        self.model, self.conversion, self.stream = model, conversion, stream
        self.device = next(model.parameters()).device
        self.eval_batches = [to_device(b, self.device) for b in eval_batches]
        self.progress, self.monitor, self.monitor_every = progress, monitor, monitor_every
        self.report = report
        with torch.no_grad(), Tap(conversion, "teacher"):
            self.targets = [hidden(call(model, b)).detach() for b in self.eval_batches]

    @torch.no_grad()
    def evaluate(self, label: str) -> None:
        layers = len(self.conversion.students)
        err, ref = [0.0] * layers, [0.0] * layers
        with Tap(self.conversion, "transfer") as tap:
            for batch in self.eval_batches:
                call(self.model, batch)
                for layer, terms in enumerate(tap.terms):
                    err[layer] += sum(float(e) for e, _, _ in terms)
                    ref[layer] += sum(float(r) for _, r, _ in terms)
                tap.clear()
        self.report.attention_error[label] = [e / max(r, 1e-30) for e, r in zip(err, ref,
                                                                                strict=True)]
        num = den = 0.0
        for batch, target in zip(self.eval_batches, self.targets, strict=True):
            pred = hidden(call(self.model, batch))
            e, r = hidden_terms(pred, target, real_rows(batch, target))
            num, den = num + float(e), den + float(r)
        self.report.hidden_error[label] = num / max(den, 1e-30)

    def _monitor(self, stage: int, step: int, seconds: float) -> None:
        if self.monitor is None:
            return
        with torch.no_grad():
            value = self.monitor(self.model)
        self.report.curve.append({"stage": stage, "step": step, "seconds": seconds,
                                  "value": value})

    def train(self, stage: int, desc: str, params: list[nn.Parameter],
              loss_fn: Callable[[Any], Tensor], steps: int, seconds: float | None,
              lr: float, out: StageReport, first_step: int = 0,
              schedule: Schedule = "constant", warmup: float = 0.0) -> None:
        """``steps`` AdamW steps on ``loss_fn(batch)`` within ``seconds``; appends to ``out``.
        The learning rate is ``lr · lr_factor(progress)``, progress the larger of the steps'
        and the seconds' fraction spent."""
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        bar = Bar(desc, steps, seconds=seconds, enabled=self.progress)
        clock, done, out.stopped_by = 0.0, 0, "steps"
        if first_step == 0:
            self._monitor(stage, out.steps, out.seconds)
        while done < steps:
            if seconds is not None and clock >= seconds:
                out.stopped_by = "seconds"
                break
            batch = self.stream.next()
            if batch is None:
                out.stopped_by = "data"
                break
            start = time.perf_counter()
            progress = max(done / steps, 0.0 if not seconds else clock / seconds)
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(progress, schedule, warmup)
            loss = loss_fn(to_device(batch, self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clock += time.perf_counter() - start
            done += 1
            out.losses.append(float(loss.detach()))
            bar.update(done, f"loss {out.losses[-1]:.4g}", clock)
            if self.monitor_every and (out.steps + done) % self.monitor_every == 0:
                self._monitor(stage, out.steps + done, out.seconds + clock)
        bar.close(f"stopped by {out.stopped_by}")
        out.steps += done
        out.seconds += clock
