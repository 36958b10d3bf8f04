"""Python's cyclic garbage collector during a run: fewer collections of the young generations and
no full collection through the imported modules and the graph.

memsieve's stages allocate container objects by the million (per-row tuples, lists of captions,
dicts of columns), and CPython collects its youngest generation every 700 net container
allocations, the middle one every 10 of those and the whole heap every 10 of those once a
quarter of it is new since the last full collection: on the 200k-row LAION-layout full job that
was ~2,500 collections for 2.8-3.3 s of CPU, 2.2-2.6 s of it in 8-9 full collections, each
walking every object alive (the modules of Beam, torch, pandas, the graph, the stages' data).
Almost nothing a run allocates is cyclic garbage (reference counting frees the buffers), so:

- ``THRESHOLDS``: the youngest generation is collected every 10,000 net allocations, each
  older one every 20 of the younger's (200k full job: 154 collections, 1.1 s, no full
  collection, peak RSS unchanged);
- ``configure()`` (just before ``pipeline.run()``) sets them and moves every
  object alive then (the imported modules and the graph: ~166k objects) out of the collector's
  reach (``gc.freeze``): they live until the run ends anyway, and a full collection no longer
  walks them;
- ``restore()`` (when the run ends) puts the thresholds back and the frozen objects within
  reach again, so a process running several jobs (tests) collects each job's graph;
- ``freeze_at_exit()`` (the CLI, once per process) freezes every object alive when the process
  exits: the interpreter's own collections at shutdown then walk nothing (on the 200k-row full
  job they walked ~450k objects, imported torch and Beam included, for ~1 s of CPU, 3-5 s of
  wall on a loaded machine, after run.json was written). Objects still alive then are freed
  by reference counting as before; only the cycle search is skipped.

``configure()`` does not collect before freezing: the garbage of the imports and the graph
construction is small, is frozen with the graph and becomes collectable again at ``restore()``;
a full collection there cost ~0.2 s on the critical path before the first bundle.

``MEMSIEVE_GC=default`` leaves the collector as it is.
"""

from __future__ import annotations

import gc
import os

THRESHOLDS = (10_000, 20, 20)
_SAVED: list[tuple[int, int, int]] = []
_AT_EXIT = False


def enabled() -> bool:
    return os.environ.get("MEMSIEVE_GC", "").strip().lower() not in ("default", "off")


def configure() -> int:
    """Raise the collector's thresholds for a run and keep every object alive now (the modules,
    the graph) out of later collections; -> how many were frozen (0: left as is)."""
    if not enabled():
        return 0
    _SAVED.append(gc.get_threshold())
    gc.set_threshold(*THRESHOLDS)
    gc.freeze()
    return gc.get_freeze_count()


def freeze_at_exit() -> bool:
    """At interpreter exit, freeze every object alive (once per process; -> whether registered
    now). Shutdown's collections then skip them; ``MEMSIEVE_GC=default`` leaves exit as it is."""
    global _AT_EXIT
    if _AT_EXIT or not enabled():
        return False
    import atexit

    atexit.register(gc.freeze)
    _AT_EXIT = True
    return True


def restore() -> None:
    """The collector as ``configure`` found it, the frozen objects collectable again."""
    if _SAVED:
        gc.set_threshold(*_SAVED.pop())
        gc.unfreeze()
