"""What ``linearize`` did (``LinearizeReport``) and its text progress bar.

Errors are relative squared errors over real (unpadded) tokens, summed over the evaluation
batches before the ratio is taken:

    attention error of layer l = Σ ‖Kernel_l(q, k, v) − S_l‖² / Σ ‖S_l‖²,  S_l = softmax_l(q, k, v)

with teacher and student on the same q, k, v (the original model's inputs to layer l, the
model's current projections), and

    hidden error = Σ ‖h_converted − h_original‖² / Σ ‖h_original‖²

on the final hidden states (the model's first output), the original being the model as it
was passed in. 0 is exact; 1 is as far as predicting zeros.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO


@dataclass
class StageReport:
    """One training stage.

    Attributes:
        skipped: why the stage did not run (None when it ran).
        steps: optimizer steps taken; seconds: training time (evaluation excluded).
        stopped_by: ``"steps"``, ``"seconds"`` (budget), ``"data"`` (a one-pass iterable ran
            out) or None when skipped.
        losses: the training loss of every step.
        trained: names of the trained parameters.
    """

    skipped: str | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str | None = None
    losses: list[float] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)


@dataclass
class LinearizeReport:
    """Returned by ``linearize``: errors before and after each stage (see the module docstring).

    Attributes:
        attention: the student attention's class name.
        layers: attention module paths, in model order.
        attention_error: ``{"before": [per layer], "stage1": [...], "stage2": [...]}`` (a stage
            appears when it ran).
        hidden_error: ``{"before": e, "stage1": e, "stage2": e}`` likewise.
        stage1, stage2: ``StageReport`` of attention transfer and fine-tuning.
        curve: ``{"stage", "step", "seconds", "value"}`` per call of ``monitor``.
        seed: the seed used.
    """

    attention: str
    layers: list[str]
    attention_error: dict[str, list[float]] = field(default_factory=dict)
    hidden_error: dict[str, float] = field(default_factory=dict)
    stage1: StageReport = field(default_factory=StageReport)
    stage2: StageReport = field(default_factory=StageReport)
    curve: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return asdict(self)

    def __str__(self) -> str:
        columns = list(self.attention_error)
        lines = [f"linearize -> {self.attention} ({len(self.layers)} layers, seed {self.seed})"]
        for name, stage in (("stage 1 (attention transfer)", self.stage1),
                            ("stage 2 (fine-tune)", self.stage2)):
            if stage.skipped:
                lines.append(f"{name}: skipped: {stage.skipped}")
            else:
                last = f", last loss {stage.losses[-1]:.4g}" if stage.losses else ""
                lines.append(f"{name}: {stage.steps} steps, {stage.seconds:.1f} s, stopped by "
                             f"{stage.stopped_by}{last}, {len(stage.trained)} tensors trained")
        lines.append("relative error   | " + " | ".join(f"{c:>8}" for c in columns))
        for i, path in enumerate(self.layers):
            cells = " | ".join(f"{self.attention_error[c][i]:8.4g}" for c in columns)
            lines.append(f"attention {i:<6} | {cells}   ({path})")
        cells = " | ".join(f"{self.hidden_error[c]:8.4g}" for c in columns
                           if c in self.hidden_error)
        lines.append(f"final hidden     | {cells}")
        return "\n".join(lines)


class Bar:
    """A one-line text bar (``desc [####....] 12/100 steps 3.4/60s loss 0.0123``) on stderr.

    ``enabled=False`` draws nothing. Redraws at most every ``interval`` seconds; on a stream
    that is not a terminal it prints a line per 10 % instead of redrawing.
    """

    def __init__(self, desc: str, total: int, *, seconds: float | None = None,
                 enabled: bool = True, file: TextIO | None = None, interval: float = 0.2,
                 width: int = 24) -> None:
        self.desc, self.total, self.enabled = desc, max(int(total), 1), enabled
        self.seconds = seconds  # a time budget: the bar fills with whichever comes first
        self.file = sys.stderr if file is None else file
        self.interval, self.width = interval, width
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last, self._decile, self._text = 0.0, -1, ""

    def update(self, done: int, note: str = "", clock: float | None = None) -> None:
        """``done`` steps after ``clock`` seconds of the budget (default: since the start)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        clock = now - self.start if clock is None else clock
        frac = done / self.total
        if self.seconds:
            frac = max(frac, clock / self.seconds)
        frac = min(frac, 1.0)
        fill = int(frac * self.width)
        budget = f"/{self.seconds:g}" if self.seconds else ""
        self._text = (f"{self.desc} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total}"
                      f" steps {clock:.1f}{budget}s {note}")
        if self.tty:
            if now - self._last >= self.interval or frac >= 1.0:
                self.file.write("\r" + self._text)
                self.file.flush()
                self._last = now
        elif int(frac * 10) > self._decile:
            self._decile = int(frac * 10)
            self.file.write(self._text + "\n")
            self.file.flush()

    def close(self, note: str = "") -> None:
        if not self.enabled:
            return
        if self.tty:
            self.file.write("\r" + self._text + (f" {note}" if note else "") + "\n")
        elif note:
            self.file.write(f"{self.desc}: {note}\n")
        self.file.flush()
