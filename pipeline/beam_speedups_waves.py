"""Beam's in-process runner with the independent bundles of a scheduling wave run at once
(``waves``).

Beam 2.77's FnApiRunner runs a batch graph as waves: it takes the bundles in its ready queue one
by one (run the bundle, then its bookkeeping: watermarks, the buffers handed to consuming stages,
side inputs committed), and only when that queue is empty does it look for stages whose inputs
are now complete. Every bundle runs on the launching thread, so a graph with two independent
branches (memsieve's vector search and its caption near-duplicates) uses one core while the
machine has more.

With the patch, while the runner works through a wave's queue in its own order, the bundles
queued after the current one start early on a small thread pool: a bundle starts ahead of its
turn only if nothing queued before it (and not yet retired) shares its stage, one of its output
buffers or one of its input buffer objects. The bookkeeping stays Beam's own code, run on the
launching thread in queue order when each bundle's turn comes (the early run's result is handed
to it in place of running the bundle again), and after each bundle the newly ready stages join
the queue (Beam looks only when the queue is empty; its comment says either works). So every
buffer receives its writers' output in an order fixed by the queue, the scheduler takes the same
decisions on every run, and the run is as deterministic as before.
Bundles that share nothing run at once: Beam's bundle manager is thread-safe (its parallel mode
runs bundles on threads), and each pool thread gets its own in-process worker (its own data
channel, bundle processors and state cache; the state servicer is shared and locked). DoFns of
a stage that runs on two pool threads over a run are set up once per thread.

Only the in-process runner with one worker and the embedded Python environment is changed
(``--direct_num_workers`` or another environment: Beam's own loop). The pool has
``MEMSIEVE_STAGE_THREADS`` threads (default: the CPUs this process may use, at most 2); 1 turns
the patch off for a run. An error in an early bundle is raised at that bundle's turn, after the
bundles still running have finished.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from pipeline import beam_speedups_runner as runner

_LOCAL = threading.local()  # .slot: this pool thread's worker number (1, 2, ...); absent on others
_SLOTS = itertools.count(1)  # next() on a count is atomic under the GIL


def threads() -> int:
    """Pool size for a run: ``MEMSIEVE_STAGE_THREADS``, else the usable CPUs capped at 2."""
    raw = os.environ.get("MEMSIEVE_STAGE_THREADS", "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def _name_slot() -> None:
    _LOCAL.slot = next(_SLOTS)


def conflict_keys(stage_name: str, bcm, data_input) -> frozenset:
    """What a bundle must not share with a bundle queued before it to start ahead of it: its
    stage, its output buffers (data and timers) and its input buffer objects (a grouped buffer
    read by two stages is one object, partitioned by the first reader)."""
    keys = {("stage", stage_name)}
    keys.update(("out", bid) for bid in bcm.stage_data_outputs.values())
    keys.update(("timers", tid) for tid, _ in bcm.stage_timer_outputs.values())
    keys.update(("in", id(buf)) for buf in data_input.data.values())
    return frozenset(keys)


class Ahead:
    """One run's pool and the bundles started ahead of their turn (by ``id`` of their input)."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="memsieve-stage", initializer=_name_slot)
        self.started: dict[int, object] = {}  # id(DataInput) -> Future of _run_bundle's result
        self.stash: dict[int, tuple] = {}  # id(DataInput) -> result, for its bookkeeping call

    def submit(self, fn_runner, ctx, bcm, data_input):
        return self.pool.submit(_run, fn_runner, ctx, bcm, data_input)

    def start_ahead(self, fn_runner, ctx, current) -> None:
        """Start the queued bundles that conflict with nothing queued before them, while fewer
        than ``n`` bundles run (``current``: the keys of the bundle whose turn it is)."""
        blocked = set(current)
        running = 1 + len(self.started)
        for stage_name, data_input in list(ctx.queues.ready_inputs._q):
            if running >= self.n:
                break  # the pool is full: nothing more can start now
            bcm = ctx.bundle_manager_for(ctx.stages[stage_name])
            keys = conflict_keys(stage_name, bcm, data_input)
            if id(data_input) not in self.started and not keys & blocked:
                self.started[id(data_input)] = self.submit(fn_runner, ctx, bcm, data_input)
                running += 1
            blocked |= keys

    def drain(self) -> None:
        """Wait for every bundle started ahead (after an error: nothing may run on)."""
        for future in self.started.values():
            future.cancel()
        for future in self.started.values():
            if not future.cancelled():
                future.exception()
        self.started.clear()
        self.stash.clear()

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)


def _run(fn_runner, ctx, bcm, data_input):
    """A bundle's run on a pool thread: Beam's ``_run_bundle`` (without the bookkeeping)."""
    ctx.worker_handler_manager.register_process_bundle_descriptor(bcm.process_bundle_descriptor)
    manager = fn_runner._get_bundle_manager(bcm)
    return fn_runner._run_bundle(ctx, bcm, data_input, bcm.stage_data_outputs, bcm.stage_timer_outputs, manager)


def _slot_handlers(bcm):
    """The in-process worker of this pool thread (one per thread, made as Beam makes the
    embedded one and kept in the manager's handler cache under its own key, so the runner's
    ``close_all`` closes it at the end)."""
    from apache_beam.runners.portability.fn_api_runner.worker_handlers import WorkerHandler

    manager = bcm.execution_context.worker_handler_manager
    env_id = bcm.stage.environment or next(iter(manager._environments))
    key = f"{env_id}@memsieve-stage-{_LOCAL.slot}"
    cached = manager._cached_handlers[key]
    if not cached:
        env = manager._environments[env_id]
        info = manager._job_provision_info.for_environment(env)
        cached.append(WorkerHandler.create(env, manager.state_servicer, info, manager))
        cached[0].start_worker()
    return cached


def _embedded(fn_runner, stage_context) -> bool:
    """One in-process worker, no test split managers, every environment Beam's embedded one."""
    from apache_beam.portability import python_urns

    envs = stage_context.components.environments.values()
    return (
        fn_runner._num_workers == 1
        and not fn_runner._split_managers
        and bool(envs)
        and all(env.urn == python_urns.EMBEDDED_PYTHON for env in envs)
    )


def install_waves() -> None:
    from apache_beam.runners.portability.fn_api_runner import execution, fn_runner

    runner_cls, bcm_cls = fn_runner.FnApiRunner, execution.BundleContextManager
    run_stages = runner_cls.__dict__["run_stages"]
    execute = runner_cls.__dict__["_execute_bundle"]
    run_bundle = runner_cls.__dict__["_run_bundle"]
    handlers = bcm_cls.__dict__["worker_handlers"]

    def waves_run_stages(self, stage_context, stages):
        n = threads()
        if n < 2 or not _embedded(self, stage_context):
            return run_stages(self, stage_context, stages)
        self.memsieve_ahead = Ahead(n)
        try:
            return run_stages(self, stage_context, stages)
        finally:
            ahead, self.memsieve_ahead = self.memsieve_ahead, None
            ahead.close()

    def waves_execute_bundle(self, ctx, bcm, data_input):
        ahead = getattr(self, "memsieve_ahead", None)
        if ahead is None:
            return execute(self, ctx, bcm, data_input)
        future = ahead.started.pop(id(data_input), None)
        if future is None:
            future = ahead.submit(self, ctx, bcm, data_input)
        try:
            ahead.start_ahead(self, ctx, conflict_keys(bcm.stage.name, bcm, data_input))
            ahead.stash[id(data_input)] = future.result()
            out = execute(self, ctx, bcm, data_input)  # Beam's bookkeeping; its _run_bundle: the stash
        except BaseException:
            ahead.drain()  # before Beam's own clean-up closes the workers the early bundles run on
            raise
        self._schedule_ready_bundles(ctx)  # stages this bundle completed join the queue now
        return out

    def waves_run_bundle(self, ctx, bcm, data_input, *args):
        ahead = getattr(self, "memsieve_ahead", None)
        if ahead is not None and id(data_input) in ahead.stash:
            return ahead.stash.pop(id(data_input))
        return run_bundle(self, ctx, bcm, data_input, *args)

    def slot_worker_handlers(self):
        if getattr(_LOCAL, "slot", None) is None:
            return handlers.fget(self)
        return _slot_handlers(self)

    runner._patch(runner_cls, "run_stages", waves_run_stages)
    runner._patch(runner_cls, "_execute_bundle", waves_execute_bundle)
    runner._patch(runner_cls, "_run_bundle", waves_run_bundle)
    runner._patch(bcm_cls, "worker_handlers", property(slot_worker_handlers))
