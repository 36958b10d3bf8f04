"""Live progress for a person watching a local run (rich), logging everywhere else.

The driver opens a ``Progress`` for the run; stages report through ``advance``. On the
in-process runner the stages run in the driver's process and the bars move; on remote
workers there is no bar in that process and ``advance`` does nothing (their logs remain).
"""

from __future__ import annotations

import contextlib
import sys
import threading

_lock = threading.Lock()
_progress = None
_tasks: dict[str, int] = {}


@contextlib.contextmanager
def live(n_shards: int, stages: list[str]):
    """Show one bar per stage while the block runs (only on a terminal)."""
    global _progress
    if not sys.stderr.isatty():
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    )
    with progress:
        with _lock:
            _progress = progress
            _tasks.clear()
            _tasks["shards"] = progress.add_task("shards read", total=n_shards)
            for stage in stages:
                _tasks[stage] = progress.add_task(stage, total=None)
        try:
            yield
        finally:
            with _lock:
                _progress = None


def advance(stage: str, n: int = 1) -> None:
    progress = _progress
    if progress is None:
        return
    with _lock:
        task = _tasks.get(stage)
        if task is not None:
            progress.advance(task, n)
