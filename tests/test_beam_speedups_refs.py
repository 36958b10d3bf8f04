"""pipeline.beam_speedups_refs (elements by reference in the in-process runner): which values pass
as they are, that chunks really cross by reference, that a GroupByKey buffer holding objects
gives Beam's own groups and bytes, and that two workers (``--direct_num_workers=2``) see what
Beam's own runner gives them. The same-elements-in-the-same-order check over every path of a
memsieve graph is ``tests/test_beam_speedups_runner.py`` (``refs`` on)."""

import numpy as np
import pytest
from apache_beam.coders import coders
from apache_beam.coders.coder_impl import _ConcatSequence
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import execution
from apache_beam.transforms import core, window
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import beam_speedups_grouping as grouping
from pipeline import beam_speedups_refs as refs
from pipeline import beam_speedups_runner as runner
from tests import test_beam_speedups_runner as graph

FP = coders.FastPrimitivesCoder()
DFP = coders.DeterministicFastPrimitivesCoderV2(FP, "test")
LP = coders.LengthPrefixCoder
GLOBAL = window.GlobalWindow()


def _windowed(value_coder):
    return coders.WindowedValueCoder(value_coder, coders.GlobalWindowCoder())


def test_value_kinds():
    assert refs.value_kind(_windowed(LP(FP))) == refs.value_kind(_windowed(FP)) == "fp"
    assert refs.value_kind(_windowed(coders.TupleCoder([LP(DFP), LP(FP)]))) == "kv"
    for other in (
        coders.VarIntCoder(),
        coders.TupleCoder([coders.StrUtf8Coder(), LP(FP)]),
        coders.TupleCoder([LP(DFP), coders.IterableCoder(LP(FP))]),
        coders.PickleCoder(),
    ):
        assert refs.value_kind(_windowed(other)) is None, other
    assert refs.value_kind(LP(FP)) is None  # not a windowed value coder


def test_what_passes_as_it_is():
    lazy = _ConcatSequence([1, 2], [3])
    assert type(FP.decode(FP.encode(lazy))) is list  # the premise
    assert refs.passes([np.zeros(3), "a", {"b": (1,)}], "fp") and refs.passes(None, "fp")
    assert not refs.passes(lazy, "fp")  # FastPrimitivesCoder hands Beam's lazy iterables on as lists
    assert refs.passes(("k", [1]), "kv") and refs.passes(((None, 2, 1.5, b"x", ("y", True)), 0), "kv")
    assert not refs.passes(["k", 1], "kv")  # a list key-value: decoded as a tuple
    assert not refs.passes(("k", lazy), "kv")
    assert not refs.passes((1 << 70, 1), "kv")  # beyond 64 bits: pickled
    assert not refs.passes((np.int64(3), 1), "kv") and not refs.passes((frozenset(), 1), "kv")


class Dropping:
    """Pickled without its payload (as ``spill.InputRows``)."""

    def __init__(self, payload):
        self.payload = payload

    def __getstate__(self):
        return {"payload": None}


class Plain:
    def __init__(self, payload):
        self.payload = payload


def test_own_pickling_hooks_cross_encoded():
    assert FP.decode(FP.encode(Dropping([1]))).payload is None  # the premise
    assert not refs.passes(Dropping([1]), "fp") and not refs.passes(("k", [Dropping(1)]), "kv")
    assert not refs.passes({"a": (1, Dropping(2))}, "fp") and not refs.passes([[[[["deep"]]]]], "fp")
    assert refs.passes(Plain([1]), "fp") and refs.passes(("k", {"a": [np.zeros(2)], 2: "b"}), "kv")


def _pre_post(worker: bool):
    """A GroupByKey's coders as the worker (length-prefixed FastPrimitives) or the runner (bytes) sees them."""
    key, value = (LP(DFP), LP(FP)) if worker else (coders.BytesCoder(), coders.BytesCoder())
    return _windowed(coders.TupleCoder([key, value])), _windowed(coders.TupleCoder([key, coders.IterableCoder(value)]))


def _elements(seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [
        WindowedValue((f"k{rng.integers(7)}", [int(rng.integers(100)), "x" * int(rng.integers(5))]), 0, [GLOBAL])
        for _ in range(60)
    ]


def _buffer():
    pre, post = _pre_post(worker=False)
    return execution.GroupingBuffer(pre, post, core.Windowing(window.GlobalWindows()))


@pytest.fixture
def installed():
    runner.install_runner(["group", "plane", "refs"])
    yield
    runner.uninstall_runner()


@pytest.mark.parametrize("mixed", [False, True])
def test_grouping_buffer_gives_beams_groups(installed, mixed):
    worker_pre, worker_post = _pre_post(worker=True)
    impl = worker_pre.get_impl()
    chunks = [_elements(i) for i in range(3)]
    theirs, ours = _buffer(), _buffer()
    for i, chunk in enumerate(chunks):
        encoded = b"".join(impl.encode_nested(wv) for wv in chunk)
        runner._original(execution.GroupingBuffer, "append")(theirs, encoded)
        if mixed and i == 1:  # bytes after objects: the buffer turns to bytes
            ours.append(encoded)
        else:
            ours.append(runner.token(refs.Elements(chunk, worker_pre, impl)))
    assert ("memsieve_plan" in ours.__dict__) is not mixed
    for n in (1, 3) if not mixed else (2,):
        expected = runner._original(execution.GroupingBuffer, "partition")(theirs, n)
        got = ours.partition(n)
        assert len(got) == len(expected) == n
        decode = worker_post.get_impl().decode_all
        for mine, beams in zip(got, expected, strict=True):
            assert list(decode(b"".join(map(refs.as_bytes, mine)))) == list(decode(b"".join(beams)))
        assert b"".join(map(refs.as_bytes, ours.partition(n)[0])) == b"".join(theirs.partition(n)[0])
        theirs, ours = _buffer(), _buffer()
        for chunk in chunks:
            runner._original(execution.GroupingBuffer, "append")(theirs, b"".join(impl.encode_nested(w) for w in chunk))
            ours.append(runner.token(refs.Elements(chunk, worker_pre, impl)))
    assert b"".join(ours) == b"".join(theirs)  # read as bytes (a side input): Beam's bytes
    assert runner.pending() == 0


def test_same_bytes():
    assert grouping.same_bytes(*reversed(_pre_post(worker=True)[:1] + _pre_post(worker=False)[:1]))
    assert grouping.same_bytes(_pre_post(worker=False)[1], _pre_post(worker=True)[1])
    assert not grouping.same_bytes(coders.VarIntCoder(), LP(FP))
    assert not grouping.same_bytes(_windowed(coders.BytesCoder()), _windowed(coders.VarIntCoder()))


def test_chunks_cross_by_reference(monkeypatch):
    kinds = {"refs": 0, "bytes": 0}
    token = runner.token

    def counting(payload):
        kinds["refs" if type(payload) is refs.Elements else "bytes"] += 1
        return token(payload)

    monkeypatch.setattr(runner, "token", counting)
    beams = graph._run([])
    assert graph._run(["group", "plane", "sizes", "refs"]) == beams
    assert kinds["refs"] >= 10  # the rest: ints (VarIntCoder), Impulse, the runner's bytes


def _sorted(seen: dict) -> dict:
    return {label: sorted(map(repr, values)) for label, values in seen.items()}


def test_two_workers(monkeypatch):
    """``--direct_num_workers=2``: bundles in threads, buffers partitioned (and re-split) for two workers."""
    monkeypatch.setattr(graph, "PipelineOptions", lambda args: PipelineOptions(["--direct_num_workers=2"]))
    beams = _sorted(graph._run([]))
    assert _sorted(graph._run(["group", "plane", "sizes", "refs"])) == beams
    assert set(beams) >= {"gbk", "tables", "cogbk", "side", "combine"}


def test_off_switch_installs_no_refs(monkeypatch):
    from apache_beam.runners.worker import bundle_processor

    from pipeline import beam_speedups

    original = bundle_processor.DataOutputOperation.process
    for setting in ("off", "inspect,group,plane,sizes"):
        monkeypatch.setenv("MEMSIEVE_BEAM_SPEEDUPS", setting)
        beam_speedups.install()
        try:
            assert bundle_processor.DataOutputOperation.process is original
        finally:
            beam_speedups.uninstall()
    monkeypatch.setenv("MEMSIEVE_BEAM_SPEEDUPS", "refs")  # refs alone brings the plane it needs
    beam_speedups.install()
    try:
        assert bundle_processor.DataOutputOperation.process is not original
        assert runner._INSTALLED == {"plane", "refs"}
    finally:
        beam_speedups.uninstall()
    assert bundle_processor.DataOutputOperation.process is original
