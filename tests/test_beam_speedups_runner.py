"""pipeline.beam_speedups_runner: the in-process runner with its data plane passing payloads by token and
size sampling off gives the same elements in the same order as Beam's own, on every path a
memsieve graph takes (GroupByKey, CoGroupByKey, side inputs, Flatten, combiners, state, merging
windows, elements above the 10 MB flush size), parks nothing past a run, and stays off when
switched off."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.coders import VarIntCoder, coders
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import execution
from apache_beam.runners.worker import bundle_processor, data_plane
from apache_beam.transforms import core, window
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import beam_speedups, beam_speedups_runner

SEEN: dict[str, list] = {}
COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())


class Record(beam.DoFn):
    """Appends what it sees, in arrival order, to SEEN[label] (the runner is in-process)."""

    def __init__(self, label):
        self.label = label

    def process(self, x):
        SEEN.setdefault(self.label, []).append(_plain(x))


class Counting(beam.DoFn):
    def process(self, kv, count=beam.DoFn.StateParam(COUNT)):
        n = (count.read() or 0) + 1
        count.write(n)
        yield kv[0], n


def _plain(x):
    """A comparable form of an element (arrays and tables by content)."""
    if isinstance(x, np.ndarray):
        return ("nd", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, pa.Table):
        return ("table", x.to_pydict())
    if isinstance(x, (list, tuple)):
        return type(x).__name__, [_plain(v) for v in x]
    if isinstance(x, dict):
        return "dict", sorted((k, _plain(v)) for k, v in x.items())
    if hasattr(x, "__iter__") and not isinstance(x, (str, bytes)):
        return "iter", [_plain(v) for v in x]
    return x


def _big(i: int):
    rng = np.random.default_rng(i)
    return i % 3, rng.random(3_000_000 if i == 0 else 20_000, dtype=np.float32)  # 12 MB: past the flush size


def _table(i: int):
    return f"k{i % 2}", pa.table({"id": list(range(i, i + 50)), "caption": [f"c{j}" for j in range(50)]})


def _graph(p):
    nums = p | "nums" >> beam.Create(range(40))
    arrays = p | "idx" >> beam.Create(range(6)) | "big" >> beam.Map(_big)
    tables = p | "tidx" >> beam.Create(range(5)) | "tables" >> beam.Map(_table)
    grouped = (
        arrays | "gbk" >> beam.GroupByKey() | "sizes" >> beam.MapTuple(lambda k, vs: (k, sorted(len(v) for v in vs)))
    )
    grouped | "r_gbk" >> beam.ParDo(Record("gbk"))
    n_arrays = beam.pvalue.AsSingleton(arrays | beam.combiners.Count.Globally())
    # a side input computed from ``arrays`` breaks fusion: the consumer reads ``arrays`` back, in chunks
    arrays | "with_n" >> beam.Map(lambda kv, n: (kv, n), n_arrays) | "r_arrays" >> beam.ParDo(Record("arrays"))
    tables | "tgbk" >> beam.GroupByKey() | "r_tables" >> beam.ParDo(Record("tables"))
    keyed = nums | "key" >> beam.Map(lambda x: (x % 4, x))
    (
        {"a": keyed, "b": keyed | "sq" >> beam.Map(lambda kv: (kv[0], kv[1] ** 2))} | beam.CoGroupByKey()
    ) | "r_cogbk" >> beam.ParDo(Record("cogbk"))
    total = nums | beam.CombineGlobally(sum)
    side = nums | "side" >> beam.Map(
        lambda x, s, lst: (x + s, len(lst)), beam.pvalue.AsSingleton(total), beam.pvalue.AsList(nums)
    )
    side | "r_side" >> beam.ParDo(Record("side"))
    (keyed, keyed) | beam.Flatten() | "perkey" >> beam.CombinePerKey(sum) | "r_combine" >> beam.ParDo(Record("combine"))
    keyed | "state" >> beam.ParDo(Counting()) | "r_state" >> beam.ParDo(Record("state"))
    stamped = nums | "stamp" >> beam.Map(lambda x: window.TimestampedValue(("s", x), x * 10 if x < 20 else 1000 + x))
    sessions = stamped | "sessions" >> beam.WindowInto(window.Sessions(15)) | "sgbk" >> beam.GroupByKey()
    (
        sessions
        | "ssorted" >> beam.MapTuple(lambda k, vs: (k, sorted(vs)))
        | "r_sessions" >> beam.ParDo(Record("sessions"))
    )
    (
        keyed
        | "none" >> beam.Filter(lambda kv: kv[1] < 0)
        | "empty" >> beam.GroupByKey()
        | "r_empty" >> beam.ParDo(Record("empty"))
    )


def _run(names) -> dict[str, list]:
    SEEN.clear()
    beam_speedups_runner.install_runner(names)
    try:
        with beam.Pipeline(options=PipelineOptions(["--direct_num_workers=1"])) as p:
            _graph(p)
        assert beam_speedups_runner.pending() == 0  # every parked payload was taken back
        return dict(SEEN)
    finally:
        beam_speedups_runner.uninstall_runner()


@pytest.fixture(scope="module")
def beams_own():
    return _run([])


def test_same_elements_in_the_same_order(beams_own):
    counted = {"n": 0}
    token = beam_speedups_runner.token

    def counting_token(payload):
        counted["n"] += 1
        return token(payload)

    beam_speedups_runner.token = counting_token
    try:
        patched = _run(["group", "plane", "sizes", "refs"])
    finally:
        beam_speedups_runner.token = token
    assert counted["n"] > 20  # the patch carried the payloads
    assert (
        set(patched)
        == set(beams_own) - {"empty"}
        == {"gbk", "arrays", "tables", "cogbk", "side", "combine", "state", "sessions"}
    )
    for label, seen in beams_own.items():
        assert patched[label] == seen, label
    assert len(beams_own["sessions"]) == 2  # the merging-window path really merged


def test_each_patch_alone(beams_own):
    for names in (["group"], ["plane"], ["sizes"], ["plane", "group"], ["refs"], ["refs", "group"]):
        assert _run(names) == beams_own


def _grouping_buffer(windowing):
    lp = coders.LengthPrefixCoder(coders.BytesCoder())
    pre = coders.WindowedValueCoder(coders.TupleCoder([lp, lp]), windowing.windowfn.get_window_coder())
    post = coders.WindowedValueCoder(
        coders.TupleCoder([lp, coders.IterableCoder(lp)]), windowing.windowfn.get_window_coder()
    )
    buf = execution.GroupingBuffer(pre, post, windowing)
    rng = np.random.default_rng(0)
    impl = pre.get_impl()
    for _ in range(3):
        elements = [
            WindowedValue(
                (b"k%d" % rng.integers(40), rng.bytes(int(rng.integers(0, 3000)))),
                int(rng.integers(0, 100)),
                [window.IntervalWindow(0, 50)],
            )
            for _ in range(400)
        ]
        buf.append(b"".join(impl.encode_nested(e) for e in elements))
    return buf, post.get_impl()


@pytest.mark.parametrize("windowing", [core.Windowing(window.GlobalWindows()), core.Windowing(window.FixedWindows(50))])
def test_partition_same_groups_same_parts(monkeypatch, windowing):
    monkeypatch.setattr(beam_speedups_runner, "_CHUNK", 5000)  # many chunks
    for n in (1, 3):
        theirs, decoder = _grouping_buffer(windowing)
        ours, _ = _grouping_buffer(windowing)
        expected = theirs.partition(n)
        got = beam_speedups_runner._partition(ours, n)
        assert len(got) == len(expected) == n
        assert sum(len(part) for part in got) > n  # cut into chunks
        for mine, beams in zip(got, expected, strict=True):
            assert list(decoder.decode_all(b"".join(mine))) == list(decoder.decode_all(b"".join(beams)))
        assert not ours._table and beam_speedups_runner._partition(ours, n) is got  # released, then cached


def test_resolve_and_token():
    payload = b"x" * 100
    t = beam_speedups_runner.token(payload)
    assert len(t) == 40 and t != payload
    assert beam_speedups_runner.resolve(b"not a token") == b"not a token"
    assert beam_speedups_runner.resolve(t) is payload
    with pytest.raises(RuntimeError, match="read twice"):
        beam_speedups_runner.resolve(t)
    assert beam_speedups_runner.pending() == 0


def test_uninstall_restores_beam():
    before = (
        bundle_processor.DataInputOperation.process_encoded,
        execution.ListBuffer.append,
        data_plane.InMemoryDataChannel.output_stream,
        bundle_processor.BundleProcessor.__init__,
    )
    beam_speedups_runner.install_runner(["plane", "sizes"])
    beam_speedups_runner.install_runner(["plane", "sizes"])  # idempotent: one wrapper, not two
    assert execution.ListBuffer.append.__wrapped__ is before[1]
    beam_speedups_runner.uninstall_runner()
    after = (
        bundle_processor.DataInputOperation.process_encoded,
        execution.ListBuffer.append,
        data_plane.InMemoryDataChannel.output_stream,
        bundle_processor.BundleProcessor.__init__,
    )
    assert after == before


class BadOutput(beam.DoFn):
    def process(self, x):
        yield "not an int" if x == 3 else x


def test_type_checked_outputs_keep_sampling():
    """--performance_runtime_type_check checks sampled outputs: still caught with the patch."""
    beam_speedups_runner.install_runner(["sizes"])
    try:
        with pytest.raises(Exception, match="Type"):
            with beam.Pipeline(options=PipelineOptions(["--performance_runtime_type_check"])) as p:
                _ = p | beam.Create(range(5)) | beam.ParDo(BadOutput()).with_output_types(int) | beam.Map(lambda x: x)
    finally:
        beam_speedups_runner.uninstall_runner()


def test_switch(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_BEAM_SPEEDUPS", "off")
    assert beam_speedups.enabled() == []
    monkeypatch.setenv("MEMSIEVE_BEAM_SPEEDUPS", "sizes, inspect,bogus")
    assert beam_speedups.enabled() == ["inspect", "sizes"]
    monkeypatch.delenv("MEMSIEVE_BEAM_SPEEDUPS")
    assert beam_speedups.enabled() == ["inspect", "group", "plane", "sizes", "refs", "waves"]
    monkeypatch.setenv("MEMSIEVE_BEAM_SPEEDUPS", "off")
    original = execution.ListBuffer.append
    beam_speedups.install()
    try:
        assert execution.ListBuffer.append is original
    finally:
        beam_speedups.uninstall()


def test_other_beam_release_gets_no_patch(monkeypatch):
    import apache_beam

    original = execution.ListBuffer.append
    monkeypatch.setattr(apache_beam, "__version__", "2.78.0")
    beam_speedups_runner.install_runner(["group", "plane", "sizes"])
    try:
        assert execution.ListBuffer.append is original and not beam_speedups_runner._SAVED
    finally:
        beam_speedups_runner.uninstall_runner()
