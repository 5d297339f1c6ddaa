"""Progress bars for the ListOps runs: one line per run, all drawn by the parent process.

Runs may train in worker processes (``train.run_in_processes``). A worker never draws: bars
drawn by several processes move one terminal cursor independently, so they duplicate and leave
fragments (``| peak MB |2it/s, loss=4.489]``) in whatever is printed next. Each run reports
``progress(done, note)`` instead (``done`` = units finished so far, training steps then
evaluation batches; ``note`` = a short status); the parent owns one bar per run and closes
every bar, in order, before the results table is printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, TextIO

#: ``progress(done, note)``: a run has finished ``done`` units of its work; ``note`` is its state.
Progress = Callable[[int, str], None]


class RunBars:
    """One bar per run (position ``i`` for run ``i``); ``close`` (or leaving ``with``) closes all.

    Args:
        names: the runs' display names, in position order.
        totals: units of work per run (what its ``progress`` counts up to).
        enabled: ``False`` draws nothing (``--quiet``); ``update`` is then a no-op.
        file: where to draw (default ``sys.stderr``, what tqdm uses).
    """

    def __init__(
        self,
        names: Sequence[str],
        totals: Sequence[int],
        *,
        enabled: bool = True,
        file: TextIO | None = None,
    ) -> None:
        if len(names) != len(totals):
            raise ValueError(f"names and totals: expected equal lengths, got {len(names)} and "
                             f"{len(totals)}")
        self.file = sys.stderr if file is None else file
        width = max((len(name) for name in names), default=0)
        bar = _bar_class()
        self.bars = [
            bar(total=total, desc=name.ljust(width), position=i, leave=True,
                disable=not enabled, file=self.file, postfix="waiting")
            for i, (name, total) in enumerate(zip(names, totals, strict=True))
        ]

    def update(self, index: int, done: int, note: str = "") -> None:
        """Run ``index`` has done ``done`` units (absolute: a repeated report is harmless)."""
        bar = self.bars[index]
        if bar.disable:
            return
        if bar.started_at is None:  # the clock runs from the run's first report, not from here
            bar.reset()
            bar.started_at = bar.start_t
        if note:
            bar.set_postfix_str(note, refresh=False)
        if done != bar.n:
            bar.update(done - bar.n)  # redraws when tqdm's interval has passed
        elif note:
            bar.refresh()
        if bar.n >= bar.total and bar.finished_at is None:
            bar.finished_at = time.time()  # its elapsed time and rate stop here

    def reporter(self, index: int) -> Progress:
        """``progress(done, note)`` for run ``index`` (for runs in this process)."""
        return partial(self.update, index)

    def close(self) -> None:
        """Close every bar in position order; the cursor ends on the line below the last one."""
        for bar in self.bars:
            bar.close()
        getattr(self.file, "flush", lambda: None)()

    def __enter__(self) -> RunBars:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _bar_class() -> type[Any]:
    """tqdm with a clock that stops when the run is done (imported only when bars are made).

    Bars stay open until every run has finished (closing one earlier would redraw it over the
    first line); without this, each would show the whole job's time when they are closed.
    """
    from tqdm.auto import tqdm

    class RunBar(tqdm):  # type: ignore[misc, valid-type]
        started_at: float | None = None
        finished_at: float | None = None

        @property
        def format_dict(self) -> dict[str, Any]:
            values = super().format_dict
            if self.finished_at is not None:
                values["elapsed"] = self.finished_at - self.start_t
            return values

    return RunBar
