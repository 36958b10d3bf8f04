"""pipeline.beam_speedups_waves: the in-process runner starts the independent bundles of a wave
on a thread pool. Two branches that can only finish together (a barrier) finish; every path of
the runner test graph gives the same elements in the same order as Beam's own loop; an error in
a bundle started early stops the run with that error and leaves no pool thread behind; one
thread (``MEMSIEVE_STAGE_THREADS=1``) is Beam's own loop."""

import threading

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import beam_speedups_runner, beam_speedups_waves
from tests import test_beam_speedups_runner as graph

PATCHES = ["group", "plane", "sizes", "refs", "waves"]
MET: dict[str, str] = {}  # branch -> the thread that ran it
GATE: dict[str, threading.Barrier] = {}


class Meet(beam.DoFn):
    """Waits (at most 20 s) for the other branch's bundle at a barrier of two."""

    def __init__(self, label):
        self.label = label

    def process(self, x):
        GATE["barrier"].wait(timeout=20)
        MET[self.label] = threading.current_thread().name
        yield x


class Where(beam.DoFn):
    def __init__(self, label):
        self.label = label

    def process(self, x):
        MET[self.label] = threading.current_thread().name
        yield x


def _boom(x):
    raise ValueError("bundle failed on purpose")


def _slow(x):
    threading.Event().wait(0.3)
    return x


def _branches(p, fn_a, fn_b):
    """Two branches behind their own shuffle: their read stages are ready in the same wave."""
    src = p | beam.Create([1])
    src | "ra" >> beam.Reshuffle() | "a" >> fn_a
    src | "rb" >> beam.Reshuffle() | "b" >> fn_b


def _run(build, names=PATCHES):
    beam_speedups_runner.install_runner(names)
    try:
        with beam.Pipeline(options=PipelineOptions(["--direct_num_workers=1"])) as p:
            build(p)
    finally:
        beam_speedups_runner.uninstall_runner()


def _stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("memsieve-stage")]


def test_independent_bundles_run_at_once(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_STAGE_THREADS", "2")
    MET.clear()
    GATE["barrier"] = threading.Barrier(2)
    _run(lambda p: _branches(p, beam.ParDo(Meet("a")), beam.ParDo(Meet("b"))))
    assert set(MET) == {"a", "b"}
    assert MET["a"] != MET["b"] and all(n.startswith("memsieve-stage") for n in MET.values())
    assert not _stage_threads()  # the pool is shut down with the run


def test_one_thread_is_beams_loop(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_STAGE_THREADS", "1")
    MET.clear()
    _run(lambda p: _branches(p, beam.ParDo(Where("a")), beam.ParDo(Where("b"))))
    assert MET == {"a": threading.current_thread().name, "b": threading.current_thread().name}
    assert beam_speedups_waves.threads() == 1


def test_same_elements_in_the_same_order(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_STAGE_THREADS", "2")
    beams_own = graph._run([])
    with_waves = graph._run(PATCHES)
    assert set(with_waves) >= {"gbk", "arrays", "tables", "cogbk", "side", "combine", "state", "sessions"}
    for label, seen in with_waves.items():
        assert seen == beams_own[label], label


def test_error_in_an_early_bundle(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_STAGE_THREADS", "2")
    with pytest.raises(Exception, match="bundle failed on purpose"):
        _run(lambda p: _branches(p, beam.Map(_slow), beam.Map(_boom)))
    assert not _stage_threads()


def test_threads_setting(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_STAGE_THREADS", "3")
    assert beam_speedups_waves.threads() == 3
    monkeypatch.setenv("MEMSIEVE_STAGE_THREADS", "x")
    assert beam_speedups_waves.threads() == 1
    monkeypatch.delenv("MEMSIEVE_STAGE_THREADS")
    assert 1 <= beam_speedups_waves.threads() <= 2
