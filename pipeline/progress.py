"""Progress of every stage: rich bars on a terminal, periodic plain log lines elsewhere, and
per-stage wall times and item counts for ``run.json``.

Stages report from inside their DoFns through ``begin(stage)`` (work started: a model load, a
global step) and ``advance(stage, n)`` (n items done). Each call does two things:

- it updates this process's display: a rich bar when the driver opened ``live`` on a terminal,
  otherwise a log line ``progress <stage>: done/total unit (pct), rate/s, ETA`` at most every
  ``interval`` seconds per stage (the first event of a stage is always logged). On the
  in-process DirectRunner the DoFns run in the driver and totals are known (shards from the
  start; per-sample stages once every shard has been read). On worker processes (the
  multiprocess DirectRunner, Dask, Dataflow) each worker logs its own lines.
- it records Beam metrics in the ``memsieve.progress`` namespace: a counter of items and a
  distribution of event times (ms), whose min and max give the stage's wall time on any
  runner that reports metrics (``stage_report``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

log = logging.getLogger("memsieve.progress")

NAMESPACE = "memsieve.progress"
STAGES = ("read", "decode", "embed", "search", "dedup", "triggers", "probe", "decide", "write")
ALIASES = {"shards": "read", "samples decoded": "decode"}  # names used by older call sites
UNITS = {
    "read": "shards",
    "decode": "samples",
    "embed": "images",
    "search": "rows",
    "dedup": "samples",
    "triggers": "samples",
    "probe": "captions",
    "decide": "keys",
    "write": "rows",
}
# per-sample stages whose total is the number of decoded samples once every shard is read
LIKE_DECODE = ("decode", "embed", "dedup", "triggers", "probe")
DEFAULT_INTERVAL_S = float(os.environ.get("MEMSIEVE_PROGRESS_INTERVAL", "10"))

_lock = threading.Lock()


class _State:
    def __init__(self):
        self.mode = "lines"  # lines | bars | off
        self.interval = DEFAULT_INTERVAL_S
        self.totals: dict[str, int] = {}
        self.like: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.emitted: dict[str, float] = {}
        self.bars = None
        self.tasks: dict[str, int] = {}
        self.metrics: dict[tuple[str, str], object] = {}


_state = _State()


_want_bars: bool | None = None  # None: bars when stderr is a terminal


def configure(mode: str = "lines", interval: float | None = None, bars: bool | None = None) -> None:
    """The driver's choice: ``lines`` (default) or ``off``; ``bars`` for ``live`` (None: on a terminal)."""
    global _want_bars
    with _lock:
        _want_bars = bars
        _state.mode = mode
        if interval is not None:
            _state.interval = float(interval)


def reset() -> None:
    """Forget every stage's counts (a new run in the same process)."""
    global _state
    with _lock:
        mode, interval = _state.mode, _state.interval
        _state = _State()
        _state.mode, _state.interval = mode, interval


def expect(stage: str, total: int | None = None, like: str | None = None) -> None:
    """Declare a stage's total, or that it will process as many items as stage ``like`` did."""
    stage = ALIASES.get(stage, stage)
    with _lock:
        if total is not None:
            _state.totals[stage] = int(total)
        if like is not None:
            _state.like[stage] = ALIASES.get(like, like)


def _metric(kind: str, stage: str, name: str):
    key = (kind, f"{stage}.{name}")
    m = _state.metrics.get(key)
    if m is None:
        from apache_beam.metrics.metric import Metrics

        m = Metrics.counter(NAMESPACE, key[1]) if kind == "counter" else Metrics.distribution(NAMESPACE, key[1])
        _state.metrics[key] = m
    return m


def _record_time(stage: str, now: float) -> None:
    try:
        _metric("distribution", stage, "ms").update(int(now * 1000))
    except Exception:  # outside a Beam step, or Beam absent: the local display still works
        pass


def begin(stage: str) -> None:
    """The stage started working (before its first item is done)."""
    stage = ALIASES.get(stage, stage)
    now = time.time()
    _record_time(stage, now)
    with _lock:
        _state.first.setdefault(stage, now)
        _state.last[stage] = now
    _show(stage, now, force=False)


def count(stage: str, name: str, n: int = 1) -> None:
    """A stage's own counter (``stages.<stage>.<name>`` in run.json), e.g. cache hits."""
    try:
        _metric("counter", ALIASES.get(stage, stage), name).inc(n)
    except Exception:
        pass


def advance(stage: str, n: int = 1) -> None:
    """``n`` more items of ``stage`` are done."""
    stage = ALIASES.get(stage, stage)
    now = time.time()
    _record_time(stage, now)
    count(stage, "items", n)
    with _lock:
        _state.first.setdefault(stage, now)
        _state.last[stage] = now
        _state.counts[stage] = _state.counts.get(stage, 0) + n
    _show(stage, now, force=False)


def _total(stage: str) -> int | None:
    if stage in _state.totals:
        return _state.totals[stage]
    like = _state.like.get(stage)
    read_total = _state.totals.get("read")
    if like and read_total is not None and _state.counts.get("read", 0) >= read_total:
        return _state.counts.get(like, 0)
    return None


def line(stage: str, now: float | None = None) -> str:
    """``progress probe: 64/104 captions (62%), 3.2/s, ETA 12s`` (or without total and ETA)."""
    now = time.time() if now is None else now
    done = _state.counts.get(stage, 0)
    total = _total(stage)
    elapsed = max(now - _state.first.get(stage, now), 1e-9)
    rate = done / elapsed if done else 0.0
    unit = UNITS.get(stage, "items")
    head = f"progress {stage}: {done}"
    text = f"{head}/{total} {unit} ({done / total:.0%})" if total else f"{head} {unit}"
    if not done:
        text += ", started"
    elif elapsed >= 1:
        text += f", {rate:.3g}/s"
    if total and rate > 0 and done < total and elapsed >= 1:
        text += f", ETA {_duration((total - done) / rate)}"
    return text + f", elapsed {_duration(elapsed)}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _show(stage: str, now: float, force: bool) -> None:
    with _lock:
        if _state.mode == "off":
            return
        if _state.mode == "bars" and _state.bars is not None:
            _bar(stage)
            return
        last = _state.emitted.get(stage)
        if not force and last is not None and now - last < _state.interval:
            return
        _state.emitted[stage] = now
        text = line(stage, now)
    from pipeline import logs

    logs.adopt_in_worker()
    log.info("%s", text)


def _bar(stage: str) -> None:
    bars = _state.bars
    task = _state.tasks.get(stage)
    total = _total(stage)
    if task is None:
        task = _state.tasks[stage] = bars.add_task(f"{stage} ({UNITS.get(stage, 'items')})", total=total)
    bars.update(task, completed=_state.counts.get(stage, 0), total=total)


def finish() -> None:
    """One closing line per stage seen (lines mode), so a log shows every stage's final count."""
    with _lock:
        stages = [s for s in _ordered(_state.first)]
    for stage in stages:
        _show(stage, _state.last.get(stage, time.time()), force=True)


def _ordered(stages) -> list[str]:
    return sorted(stages, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))


@contextlib.contextmanager
def live(n_shards: int, stages: list[str] | None = None, bars: bool | None = None):
    """Around ``pipeline.run()``: the read total is known; bars on a terminal, lines otherwise."""
    reset()
    expect("read", total=n_shards)
    for stage in LIKE_DECODE:
        expect(stage, like="decode")
    for stage in stages or []:
        expect(stage)
    bars = _want_bars if bars is None else bars
    use_bars = sys.stderr.isatty() if bars is None else bars
    if not use_bars or _state.mode == "off":
        try:
            yield
        finally:
            finish()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        redirect_stdout=False,
        redirect_stderr=True,
    )
    previous = _state.mode
    with progress:
        with _lock:
            _state.bars, _state.mode = progress, "bars"
        try:
            yield
        finally:
            with _lock:
                for stage, task in _state.tasks.items():  # the run is over: every bar is full
                    done = _state.counts.get(stage, 0)
                    progress.update(task, total=max(done, 1), completed=max(done, 1))
                _state.bars, _state.mode = None, previous


def local_report() -> dict[str, dict]:
    """What this process saw: {stage: {"seconds", "items"}} (the in-process runner's view)."""
    with _lock:
        return {
            s: {"seconds": round(_state.last[s] - _state.first[s], 3), "items": _state.counts.get(s, 0)}
            for s in _ordered(_state.first)
        }


def stage_report(result) -> dict[str, dict]:
    """Per-stage wall time and counters from the pipeline's metrics ({stage: {"seconds",
    "items", ...}}); falls back to this process's own view where the runner reports none."""
    out: dict[str, dict] = {}
    try:
        from apache_beam.metrics.metric import MetricsFilter

        queried = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception:
        queried = {}
    for c in queried.get("counters", []):
        stage, _, name = c.key.metric.name.partition(".")
        value = c.committed if c.committed is not None else c.attempted
        entry = out.setdefault(stage, {})
        entry[name] = entry.get(name, 0) + int(value or 0)
    for d in queried.get("distributions", []):
        stage, _, _name = d.key.metric.name.partition(".")
        value = d.committed if d.committed is not None else d.attempted
        if value is None or not value.count:
            continue
        entry = out.setdefault(stage, {})
        lo, hi = min(entry.get("_min", value.min), value.min), max(entry.get("_max", value.max), value.max)
        entry.update(_min=lo, _max=hi)
    for entry in out.values():
        lo, hi = entry.pop("_min", None), entry.pop("_max", None)
        if lo is not None:
            entry["seconds"] = round((hi - lo) / 1000, 3)
            entry["started"] = _iso(lo / 1000)
    for stage, entry in local_report().items():  # the in-process runner: this process saw it all
        mine = out.setdefault(stage, {})
        mine["seconds"] = max(mine.get("seconds", 0.0), entry["seconds"])
        mine.setdefault("items", entry["items"])
    return {s: dict(sorted(out[s].items())) for s in _ordered(out)}


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@contextlib.contextmanager
def timed(info: dict, stage: str):
    """A driver-side step (report, filtered shards) -> ``info["stages"][stage]["seconds"]``."""
    started = time.time()
    try:
        yield
    finally:
        info.setdefault("stages", {})[stage] = {"seconds": round(time.time() - started, 3)}


def tick(element, stage: str):
    """An identity step that counts one item of ``stage``."""
    advance(stage)
    return element


def Tick(stage: str):  # noqa: N802 (reads like a transform)
    """``pcoll | progress.Tick("dedup")``: counts elements as they pass, changes nothing."""
    import apache_beam as beam

    return beam.Map(tick, stage=stage)
