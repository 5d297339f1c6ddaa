"""Run calls in fresh spawned processes, a few at a time, with their progress sent home.

Each ListOps run goes in its own process so that its peak memory is its own; the workers draw
nothing, their progress reports travel by a queue to the parent, which owns the bars.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

_QUEUE: Any = None  # in a worker process: where its calls' progress reports go


def _set_queue(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _send(index: int, done: int, note: str) -> None:
    _QUEUE.put((index, done, note))


def _call_reporting(index: int, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    return fn(*args, progress=partial(_send, index), **kwargs)


def run_in_processes(
    fn: Callable[..., Any],
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    jobs: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Any]:
    """``[fn(*args, **kwargs) for args, kwargs in calls]``, ``jobs`` calls at a time, each in a
    fresh spawned process so that its peak memory is its own; results in ``calls`` order.

    With ``progress``, call ``i`` gets ``progress=`` a ``Progress`` whose reports travel by a
    queue to this process, where a thread hands them to ``progress(i, done, note)``; every
    report has been handed over when this returns. The workers draw nothing.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue() if progress is not None else None
    listener = None
    if progress is not None:

        def listen() -> None:
            for message in iter(queue.get, None):
                progress(*message)

        listener = threading.Thread(target=listen, name="listops-progress", daemon=True)
        listener.start()
    try:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, max_tasks_per_child=1,
            initializer=_set_queue, initargs=(queue,),
        ) as pool:
            futures = [
                pool.submit(fn, *args, **kwargs) if queue is None
                else pool.submit(_call_reporting, i, fn, args, kwargs)
                for i, (args, kwargs) in enumerate(calls)
            ]
            results = [f.result() for f in futures]
        # the pool has joined its workers, which flushed their queue on exit: None comes last
    finally:
        if listener is not None:
            queue.put(None)
            listener.join()
    return results
