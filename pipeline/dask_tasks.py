"""The functions ``pipeline/dask_runner.py`` puts in a Dask graph: they run on the workers.

A ParDo partition runs through Beam's own ``DoFnRunner`` (``start_bundle``, ``process``,
``finish_bundle``: a partial batch that ``BatchElements`` emits from ``finish_bundle`` is kept).
The runner is kept per worker thread and reused by every partition of its step in the same run,
so ``setup()`` (a model load) happens once per worker thread, not once per partition, and a side
input's view (a dict, a list) is built once per worker thread too. Bags hold plain values in the
global window (memsieve is a batch pipeline); a shuffle buckets keys by a hash that is the same
in every process (Python's ``hash`` of a string is not).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import zlib

_local = threading.local()


def stable_hash(key) -> int:
    """A hash of a Beam key that every worker process agrees on."""
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        data = key
    elif key is None or isinstance(key, (bool, int, float, tuple)):
        data = repr(key).encode("utf-8", "surrogatepass")
    else:
        data = pickle.dumps(key, protocol=4)
    return zlib.crc32(data)


def bucketize(items, n: int) -> list[list]:
    """One input partition's (key, value) pairs -> ``n`` buckets by key."""
    buckets: list[list] = [[] for _ in range(n)]
    for kv in items:
        buckets[stable_hash(kv[0]) % n].append(kv)
    return [buckets]  # a partition of one element: the buckets


def _combine_fn(token: tuple, spec: bytes):
    """The step's CombineFn on this thread, unpickled and set up by the step's first partition."""
    cache = getattr(_local, "combine_fns", None)
    if cache is None or _local.combine_run != token[0]:
        _local.combine_fns, _local.combine_run = {}, token[0]
        cache = _local.combine_fns
    if token not in cache:
        from apache_beam.internal import pickler

        cache[token] = fn = pickler.loads(spec)
        fn.setup()
    return cache[token]


def combine_partial(items, token: tuple, spec: bytes, n: int) -> list[list]:
    """One partition's values combined per key (one accumulator a key), cut into ``n`` buckets."""
    fn = _combine_fn(token, spec)
    accs: dict = {}
    missing = object()
    for k, v in items:
        acc = accs.get(k, missing)
        accs[k] = fn.add_input(fn.create_accumulator() if acc is missing else acc, v)
    buckets: list[list] = [[] for _ in range(n)]
    for k, acc in accs.items():
        buckets[stable_hash(k) % n].append((k, fn.compact(acc)))
    return [buckets]


def combine_merge(token: tuple, spec: bytes, *buckets: list) -> list:
    """Bucket i of every partition's accumulators -> (key, output) per key."""
    fn = _combine_fn(token, spec)
    accs: dict = {}
    for b in buckets:
        for k, acc in b:
            accs.setdefault(k, []).append(acc)
    return [(k, fn.extract_output(fn.merge_accumulators(a))) for k, a in accs.items()]


def bucket(parts: list, i: int) -> list:
    return parts[0][i]


def group(*buckets: list) -> list:
    """Bucket i of every input partition -> (key, [values]) in arrival order."""
    grouped: dict = {}
    for b in buckets:
        for k, v in b:
            grouped.setdefault(k, []).append(v)
    return list(grouped.items())


def concat(*parts: list) -> list:
    """A side input's partitions -> one list, computed once and shared by its consumers."""
    out: list = []
    for p in parts:
        out.extend(p)
    return out


def select(parts: list, tag):
    """One tagged output of a multi-output ParDo partition."""
    return parts[0].get(tag, [])


from apache_beam.runners.common import Receiver  # noqa: E402  (the workers import Beam anyway)


class _Receiver(Receiver):
    def __init__(self):
        self.values: list = []

    def receive(self, windowed_value) -> None:
        self.values.append(windowed_value.value)


class _Receivers(dict):
    """Outputs by tag; a tag the step did not declare is dropped, as on the DirectRunner."""

    def __missing__(self, tag):
        return _Null()


class _Null(Receiver):
    def receive(self, windowed_value) -> None:
        pass


def _runner(token: tuple, spec: bytes, sides: tuple):
    """The step's DoFnRunner on this thread, made (and set up) by the step's first partition."""
    run_id, step = token
    cache = getattr(_local, "runners", None)
    if cache is None or _local.run_id != run_id:  # a new run: the last run's DoFns are torn down
        _teardown(cache or {})
        _local.runners, _local.run_id = {}, run_id
    cache = _local.runners
    if step not in cache:
        cache[step] = _make_runner(spec, sides)
    return cache[step]


def _make_runner(spec: bytes, sides: tuple):
    from apache_beam.internal import pickler
    from apache_beam.runners.common import DoFnRunner
    from apache_beam.transforms.sideinputs import SideInputMap

    fn, args, kwargs, windowing, tags, label, views = pickler.loads(spec)
    receivers = _Receivers({tag: _Receiver() for tag in tags})
    side_maps = [
        SideInputMap(view, options, _Windowed(values)) for (view, options), values in zip(views, sides, strict=True)
    ]
    runner = DoFnRunner(fn, args, kwargs, side_maps, windowing, tagged_receivers=receivers, step_name=label)
    runner.setup()
    return runner, receivers


def _teardown(cache: dict) -> None:
    for runner, _ in cache.values():
        try:
            runner.teardown()
        except Exception:  # noqa: BLE001 teardown is best effort on every Beam runner
            pass


class _Windowed:
    """A materialised side input as the windowed values ``SideInputMap`` iterates."""

    def __init__(self, values: list):
        self.values = values

    def __iter__(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        windows = (GlobalWindow(),)
        for v in self.values:
            yield WindowedValue(v, 0, windows)


_cpu: dict = {}  # (run id, step) -> CPU seconds of this worker process's threads in the step


def cpu_seconds(run_id: str) -> dict:
    """This worker's CPU seconds per step of one run (``client.run`` collects them)."""
    return {step: s for (run, step), s in _cpu.items() if run == run_id}


_PROFILE = os.environ.get("MEMSIEVE_DASK_PROFILE")  # set where the workers start: cProfile them too
_profiler = None


def dump_profile(path: str) -> str:
    """This worker's cProfile of every ParDo partition so far -> ``path.<pid>``."""
    if _profiler is None:
        return ""
    _profiler.dump_stats(f"{path}.{os.getpid()}")
    return f"{path}.{os.getpid()}"


def run_dofn(items, token: tuple, spec: bytes, multi: bool, *sides):
    """One partition through a ParDo: a list of outputs, or ``[{tag: outputs}]`` for several tags."""
    global _profiler
    started = time.thread_time()
    if _PROFILE and _profiler is None:
        import cProfile

        _profiler = cProfile.Profile()
    if _profiler is not None:
        _profiler.enable()
    try:
        return _run_dofn(items, token, spec, multi, sides)
    finally:
        if _profiler is not None:
            _profiler.disable()
        _cpu[token] = _cpu.get(token, 0.0) + time.thread_time() - started


_containers: dict = {}  # (run id, step, thread) -> MetricsContainer: Beam metrics of this process


def metric_updates(run_id: str) -> list:
    """This worker's Beam metrics of one run, one ``MetricUpdates`` per step and thread."""
    return [c.get_cumulative() for (run, _, _), c in list(_containers.items()) if run == run_id]


def _metrics_scope(token: tuple):
    """A state of this thread's Beam state sampler whose metrics container is the step's."""
    from apache_beam.metrics.execution import MetricsContainer
    from apache_beam.runners.worker import statesampler

    tracker = getattr(_local, "tracker", None)
    if tracker is None or _local.tracker_run != token[0]:  # it keeps each step's state (and container)
        from apache_beam.utils.counters import CounterFactory

        tracker = _local.tracker = statesampler.StateSampler("", CounterFactory())
        _local.tracker_run = token[0]
    statesampler.set_current_tracker(tracker)
    key = (*token, threading.get_ident())
    if key not in _containers:
        for old in [k for k in _containers if k[0] != token[0]]:  # an earlier run's metrics
            _containers.pop(old, None)
        _containers[key] = MetricsContainer(token[1])
    return tracker.scoped_state(token[1], "process", metrics_container=_containers[key])


def _run_dofn(items, token: tuple, spec: bytes, multi: bool, sides: tuple):
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    runner, receivers = _runner(token, spec, sides)
    for r in receivers.values():
        r.values = []
    windows = (GlobalWindow(),)
    with _metrics_scope(token):
        runner.start()
        for x in items:
            runner.process(WindowedValue(x, 0, windows))
        runner.finish()
    if multi:
        return [{tag: r.values for tag, r in receivers.items()}]
    return receivers[None].values
