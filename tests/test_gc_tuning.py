"""pipeline.gc_tuning: a run's collector thresholds raised and the objects alive at its start frozen,
both undone when the run ends, and left alone with MEMSIEVE_GC=default."""

import gc

from pipeline import gc_tuning


def test_configure_and_restore(monkeypatch):
    monkeypatch.delenv("MEMSIEVE_GC", raising=False)
    before = gc.get_threshold()
    alive = [object(), [1, 2]]  # a container alive before the run
    try:
        assert gc_tuning.configure() > 0
        assert gc.get_threshold() == gc_tuning.THRESHOLDS
        assert gc.get_freeze_count() > 0 and not any(o is alive for o in gc.get_objects())  # frozen
        cycle = []
        cycle.append(cycle)  # cyclic garbage made during the run is still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc_tuning.restore()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_default_leaves_the_collector(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_GC", "default")
    before = gc.get_threshold()
    assert gc_tuning.configure() == 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    gc_tuning.restore()
    assert gc.get_threshold() == before
