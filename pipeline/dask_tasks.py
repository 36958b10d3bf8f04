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


# What a memsieve job's tasks import (heavy ones lazily, in the first task that needs them)
WARM_MODULES = (
    "apache_beam.runners.common",
    "apache_beam.runners.worker.statesampler",
    "apache_beam.transforms.sideinputs",
    "numpy",
    "pyarrow.parquet",
    "PIL.Image",
    "cv2",
    "scipy.ndimage",
    "scipy.stats",
    "torch",
    "spacy",
    "datasketch",
)


def warm() -> list[str]:
    """Imports what a memsieve job's tasks import, and memsieve's transforms: what each worker
    process would otherwise import in its first tasks (~3 s of CPU per worker on this machine)."""
    import importlib
    import pkgutil

    import transforms

    names = [*WARM_MODULES, *(f"transforms.{m.name}" for m in pkgutil.iter_modules(transforms.__path__))]
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 an optional extra (no open_clip, no spaCy): imported when used, if ever
            continue
        done.append(name)
    return done


def dask_setup(worker) -> None:
    """``dask worker --preload pipeline.dask_tasks`` (or ``LocalCluster(preload=[...])``): the
    imports happen when the worker starts, once, instead of in each run's first tasks."""
    warm()


class Blob:
    """A task's result as one pickled blob when it travels to another worker (nothing is pickled
    while it stays where it was made). Dask serialises a list that holds numpy arrays element by
    element, one frame per array: ~8x pickle's CPU (the ORB postings, a partition's vectors)."""

    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items

    def __reduce__(self):
        try:
            data = pickle.dumps(self.items, protocol=5)  # buffers in-band: one frame
        except Exception:  # noqa: BLE001 what stdlib pickle cannot take (a lambda in a value)
            import cloudpickle

            data = cloudpickle.dumps(self.items, protocol=5)
        return (_unblob, (data,))

    def __sizeof__(self) -> int:  # the scheduler's estimate of what a transfer costs
        from dask.sizeof import sizeof

        return 64 + sizeof(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):  # dask.bag's ``from_delayed`` peeks at a partition's first element
        return iter(self.items)


def _unblob(data: bytes) -> Blob:
    return Blob(pickle.loads(data))


def items_of(part):
    """A partition's elements: a ``Blob`` made here, or a plain list (``Create``)."""
    return part.items if isinstance(part, Blob) else part


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
    for kv in items_of(items):
        buckets[stable_hash(kv[0]) % n].append(kv)
    return [[Blob(b) for b in buckets]]  # a partition of one element: the buckets


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
    for k, v in items_of(items):
        acc = accs.get(k, missing)
        accs[k] = fn.add_input(fn.create_accumulator() if acc is missing else acc, v)
    buckets: list[list] = [[] for _ in range(n)]
    for k, acc in accs.items():
        buckets[stable_hash(k) % n].append((k, fn.compact(acc)))
    return [[Blob(b) for b in buckets]]


def combine_merge(token: tuple, spec: bytes, *buckets: list) -> list:
    """Bucket i of every partition's accumulators -> (key, output) per key."""
    fn = _combine_fn(token, spec)
    accs: dict = {}
    for b in buckets:
        for k, acc in items_of(b):
            accs.setdefault(k, []).append(acc)
    return Blob([(k, fn.extract_output(fn.merge_accumulators(a))) for k, a in accs.items()])


def bucket(parts: list, i: int) -> list:
    return parts[0][i]


def group(*buckets: list) -> list:
    """Bucket i of every input partition -> (key, [values]) in arrival order."""
    grouped: dict = {}
    for b in buckets:
        for k, v in items_of(b):
            grouped.setdefault(k, []).append(v)
    return Blob(list(grouped.items()))


def concat(*parts: list) -> list:
    """A side input's partitions -> one list, computed once and shared by its consumers."""
    out: list = []
    for p in parts:
        out.extend(items_of(p))
    return Blob(out)


def select(parts: list, tag):
    """One tagged output of a multi-output ParDo partition."""
    return Blob(parts.items.get(tag, []))


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
        SideInputMap(view, options, _Windowed(items_of(values)))
        for (view, options), values in zip(views, sides, strict=True)
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


_PROFILE = os.environ.get("MEMSIEVE_DASK_CPROFILE")  # set where the workers start: cProfile their ParDos
_profiler = None


def transfers(dask_worker) -> dict:
    """What this worker fetched from the others since it started: per step (key prefix), the
    number of results, their bytes (dask's size estimate) and the seconds spent fetching."""
    steps: dict = {}
    for entry in dask_worker.transfer_incoming_log:
        for key, nbytes in entry["keys"].items():
            name = key if isinstance(key, str) else key[0]
            step = steps.setdefault(name.rsplit("-", 1)[0], {"n": 0, "bytes": 0, "seconds": 0.0})
            step["n"] += 1
            step["bytes"] += nbytes
            step["seconds"] += entry["duration"] * nbytes / max(1, entry["total"])
    return steps


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
        for x in items_of(items):
            runner.process(WindowedValue(x, 0, windows))
        runner.finish()
    if multi:
        return Blob({tag: r.values for tag, r in receivers.items()})
    return Blob(receivers[None].values)
