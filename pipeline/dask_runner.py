"""A Beam runner on ``dask.distributed`` that computes every step once.

Beam 2.77's own DaskRunner (``apache_beam.runners.dask``) made the 2,000-sample demo job 34x
slower than in-process and was wrong in places (issue 10):

- a side input is a lazy bag that each consuming task lists again: a nested compute of the side
  input's whole upstream per consuming partition (``ProcessShards`` ran 132 times for 2 shards);
- ``Create`` puts up to 128 elements in one partition, so fewer shards than that run on one core;
- each partition calls the DoFn's ``setup()`` and ``teardown()`` (a model load per partition), and
  the outputs of ``finish_bundle`` are dropped (``BatchElements``' last, partial batch is lost);
- a ParDo's tagged outputs are merged into one bag, only the graph's last step is computed, and
  no metrics are reported.

This runner translates the pipeline itself, one bag per PCollection:

- ``Create``: one partition per element up to ``--dask_npartitions`` (default 64; so one per
  shard for the shard list), ``Reshuffle`` keeps the partitions;
- ``ParDo``: ``map_partitions`` through Beam's ``DoFnRunner`` (``pipeline/dask_tasks.py``), the
  DoFn set up once per worker thread; tagged outputs each get their own bag; Beam metrics are
  kept per step on the workers and merged when the run ends;
- a side input: its bag's partitions concatenated into one list by one task; every consumer
  depends on that task, so the upstream runs once and the list travels to each worker once;
- ``GroupByKey``: a hash shuffle (each input partition cut into buckets by a process-independent
  hash of the key, one task per output partition groups its buckets), one output partition per
  worker thread (at most ``--dask_npartitions``);
- ``CombinePerKey``: combined per key within each partition by the ``CombineFn``, the
  accumulators shuffled as above and merged;
- ``Flatten``: the bags concatenated;
- placement: partition ``i`` of every bag prefers worker thread slot ``i`` (``placement``), so only
  shuffles move data; every task result is a ``dask_tasks.Blob`` (one pickled frame in transit).

All the pipeline's leaves are computed together in one ``client.compute``, so shared steps run once.
``memsieve run --runner=DaskRunner`` (or Beam's full class path) maps to this runner.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import typing as t
import uuid

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.pipeline import PipelineVisitor, PTransformOverride
from apache_beam.runners.runner import PipelineRunner

from pipeline.dask_result import DaskResult

DEFAULT_PARTITIONS = 64
log = logging.getLogger(__name__)


class DaskRunner(PipelineRunner):
    """Runs a batch pipeline on the ``dask.distributed`` scheduler at ``--dask_client_address``."""

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.distributed as ddist
        from apache_beam.runners.dask.dask_runner import DaskOptions
        from apache_beam.runners.dask.overrides import dask_overrides

        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
        if "partition_size" in bag_kwargs:
            raise ValueError("--dask_partition_size is not supported here; use --dask_npartitions")
        client = ddist.Client(**dask_options)
        # Create -> _Create (values), Reshuffle -> identity, Flatten -> _Flatten; GroupByKey stays
        overrides = [o for o in dask_overrides() if type(o).__name__ != "GroupByKeyOverride"]
        pipeline.replace_all([*overrides, _NativeCombines()])
        threads = sum(client.nthreads().values()) or 1
        translator = Translator(bag_kwargs.get("npartitions") or DEFAULT_PARTITIONS, threads)
        pipeline.visit(translator)
        done = translator.done()
        log.info(
            "dask: %d tasks, %d steps, %d side inputs, %d worker threads",
            len(done.__dask_graph__()),
            len(translator.bags),
            len(translator.sides),
            threads,
        )
        profile = os.environ.get("MEMSIEVE_DASK_PROFILE")  # a JSON file: where the workers' time went
        started = time.time()
        if profile:
            client.get_task_stream(start=started)  # starts the scheduler's recording
        (done,) = dask.optimize(done)  # linear chains fused: one task per partition and chain
        with dask.annotate(workers=placement(client, done), allow_other_workers=True):
            futures = client.compute([done], optimize_graph=False)
        return DaskResult(client, futures, translator.run_id, profile, started)


# A batch cluster's settings (``dask scheduler``/``dask worker`` read them from their dask config):
# no work stealing, no statistical profiler sampling every thread every 10 ms, event-loop ticks, system and memory
# monitors each second instead of every 20/500/100 ms. Idle, they cost a 2-worker cluster and its
# scheduler ~7% of a core together; ~1% so.
BATCH_CONFIG = {
    "distributed.scheduler.work-stealing": False,  # a stolen task fetches its input: see placement()
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def local_cluster(n_workers: int = 2, threads_per_worker: int = 1, **kwargs):
    """A ``LocalCluster`` of worker processes on 127.0.0.1 set up as a memsieve cluster's workers
    would be (``dask worker --preload pipeline.dask_tasks`` with ``BATCH_CONFIG``): memsieve's
    imports done once when each worker starts (``dask_tasks.dask_setup``), no dashboard."""
    import dask
    from distributed import LocalCluster

    kwargs = {"preload": ["pipeline.dask_tasks"], **kwargs}
    with dask.config.set(BATCH_CONFIG):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False},
            **kwargs,
        )


def placement(client, collection):
    """Each task's preferred worker (a dict lookup, so the scheduler needs nothing of memsieve):
    partition ``i`` of every bag on worker thread slot ``i``, so a narrow chain (and a shuffle's
    cut of partition ``i``, keyed ``(name, bucket, i)``) runs where its input is and only the
    shuffles move data. Left to itself the scheduler sends a task to an idle worker when its
    input's owner is busy: whole shuffle inputs were fetched (408 MB per 2,000-sample demo run
    instead of 279 MB of shuffle buckets)."""
    from pipeline import dask_tasks

    slots = [addr for addr, n in sorted(client.nthreads().items()) for _ in range(max(1, n))]
    where: dict = collections.defaultdict(list)  # a key not in the collection (its finalize): anywhere
    for key in collection.__dask_graph__() if slots else ():  # no worker yet: anywhere
        index = key[-1] if isinstance(key, tuple) and isinstance(key[-1], int) else dask_tasks.stable_hash(key)
        where[key] = [slots[index % len(slots)]]
    return where.__getitem__


class _CombinePerKey(beam.PTransform):
    """A CombinePerKey that this runner translates itself (``Translator._combine``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def expand(self, pcoll):
        return pvalue.PCollection.from_(pcoll)


class _NativeCombines(PTransformOverride):
    """CombinePerKey without side inputs -> ``_CombinePerKey`` (``CombineGlobally``, ``Count``,
    ``ToList`` and the ORB votes included)."""

    def matches(self, applied) -> bool:
        t = applied.transform
        return type(t) is beam.CombinePerKey and not t.args and not t.kwargs and not t.side_inputs

    def get_replacement_transform_for_applied_ptransform(self, applied):
        return _CombinePerKey(applied.transform.fn)


class Translator(PipelineVisitor):
    """Beam's leaf transforms -> dask bags, one bag per PCollection."""

    def __init__(self, max_partitions: int, shuffle_partitions: int):
        self.max_partitions = max_partitions
        self.shuffle_partitions = min(shuffle_partitions, max_partitions)
        self.run_id = uuid.uuid4().hex
        self.bags: dict = {}  # PCollection -> bag
        self.consumed: set = set()
        self.sides: dict = {}  # PCollection -> Delayed list

    def visit_transform(self, node) -> None:
        from apache_beam.runners.dask.overrides import _Create, _Flatten, _Reshuffle

        transform = node.transform
        inputs = [i for i in node.inputs if not isinstance(i, pvalue.PBegin)]
        self.consumed.update(inputs)
        self.consumed.update(si.pvalue for si in node.side_inputs)
        if isinstance(transform, _Create):
            self._set(node, self._create(transform.values))
        elif isinstance(transform, _Reshuffle):
            self._set(node, self.bags[inputs[0]])
        elif isinstance(transform, _Flatten):
            self._set(node, self._flatten([self.bags[i] for i in inputs]))
        elif isinstance(transform, beam.GroupByKey):
            self._set(node, self._group(self.bags[inputs[0]], node.full_label))
        elif isinstance(transform, _CombinePerKey):
            self._set(node, self._combine(self.bags[inputs[0]], node.full_label, transform.fn))
        elif isinstance(transform, beam.ParDo):
            self._pardo(node, self.bags[inputs[0]])
        elif node.outputs:
            raise NotImplementedError(f"DaskRunner: no translation for {type(transform).__name__} ({node.full_label})")

    def leaves(self) -> list:
        """Every bag nothing consumes: computing them all computes the whole pipeline once."""
        return [bag for pcoll, bag in self.bags.items() if pcoll not in self.consumed]

    def done(self):
        """One small bag (element counts) that depends on every leaf: no leaf's data reaches the
        launching process, and the leaves' shared upstream steps run once."""
        import dask.bag as db

        return db.concat([leaf.map_partitions(_size) for leaf in self.leaves()])

    def _set(self, node, bag) -> None:
        (pcoll,) = node.outputs.values()
        self.bags[pcoll] = bag

    def _create(self, values):
        import dask.bag as db

        values = list(values)
        n = max(1, min(len(values), self.max_partitions))
        return (
            db.from_sequence(values, npartitions=n)
            if values
            else db.from_sequence([None], npartitions=1).filter(_never)
        )

    @staticmethod
    def _flatten(bags: list):
        import dask.bag as db

        return db.concat(bags) if bags else db.from_sequence([None], npartitions=1).filter(_never)

    def _group(self, bag, label: str):
        from pipeline import dask_tasks

        n = self._shuffle_width(bag)
        split = bag.map_partitions(dask_tasks.bucketize, n, token=f"{label}|split")
        return self._shuffle(split, n, label, dask_tasks.group)

    def _combine(self, bag, label: str, fn):
        """Combined per key within each partition, shuffled as accumulators, merged per key."""
        from functools import partial

        from apache_beam.internal import pickler

        from pipeline import dask_tasks

        n, token, spec = self._shuffle_width(bag), (self.run_id, label), pickler.dumps(fn)
        split = bag.map_partitions(dask_tasks.combine_partial, token, spec, n, token=f"{label}|partial")
        return self._shuffle(split, n, label, partial(dask_tasks.combine_merge, token, spec))

    def _shuffle_width(self, bag) -> int:
        return max(1, min(bag.npartitions, self.shuffle_partitions))

    def _shuffle(self, split, n: int, label: str, merge):
        """``split``'s partitions each hold ``[buckets]``: bucket i of all of them -> partition i."""
        import dask.bag as db
        from dask import delayed

        from pipeline import dask_tasks

        parts, uid = split.to_delayed(optimize_graph=False), self.run_id[:12]
        buckets = [
            [
                delayed(dask_tasks.bucket)(p, i, dask_key_name=(f"{label}|bucket-{uid}", i, j))
                for j, p in enumerate(parts)
            ]
            for i in range(n)
        ]
        merged = [delayed(merge)(*b, dask_key_name=(f"{label}|merge-{uid}", i)) for i, b in enumerate(buckets)]
        return db.from_delayed(merged)

    def _side(self, pcoll):
        from dask import delayed

        from pipeline import dask_tasks

        if pcoll not in self.sides:
            parts = self.bags[pcoll].to_delayed(optimize_graph=False)
            name = f"{pcoll.producer.full_label}|side-{self.run_id[:12]}"
            self.sides[pcoll] = delayed(dask_tasks.concat)(*parts, dask_key_name=name)
        return self.sides[pcoll]

    def _pardo(self, node, bag) -> None:
        from apache_beam.internal import pickler

        from pipeline import dask_tasks

        transform = node.transform
        tags = list(node.outputs)
        views = [(type(si), si._view_options()) for si in node.side_inputs]
        main = next(iter(node.main_inputs.values()))
        spec = pickler.dumps(
            (transform.fn, transform.args, transform.kwargs, main.windowing, tags, node.full_label, views)
        )
        sides = [self._side(si.pvalue) for si in node.side_inputs]
        token = (self.run_id, node.full_label)
        multi = len(tags) > 1
        out = bag.map_partitions(dask_tasks.run_dofn, token, spec, multi, *sides, token=f"{node.full_label}|dofn")
        for tag, pcoll in node.outputs.items():
            self.bags[pcoll] = (
                out.map_partitions(dask_tasks.select, tag, token=f"{node.full_label}|{tag}") if multi else out
            )


def _size(part) -> list[int]:
    return [len(part)]


def _never(_) -> bool:
    return False


def is_dask(runner: str) -> bool:
    return runner.rsplit(".", 1)[-1] == "DaskRunner"


RUNNER_PATH = f"{__name__}.DaskRunner"

__all__: t.Sequence[str] = ("DaskRunner", "RUNNER_PATH", "is_dask", "local_cluster")
