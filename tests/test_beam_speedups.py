"""pipeline.beam_speedups: memoised DoFn inspection gives Beam's own answers, stateful DoFns stay
stateful, and a pipeline with state runs the same."""

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import core, userstate
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from pipeline import beam_speedups

COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())


class Plain(beam.DoFn):
    def process(self, x, scale=2):
        yield x * scale


class Counting(beam.DoFn):
    def process(self, kv, count=beam.DoFn.StateParam(COUNT)):
        n = (count.read() or 0) + 1
        count.write(n)
        yield kv[0], n


class Holder:
    def method(self, x, count=beam.DoFn.StateParam(COUNT)):
        yield x


@pytest.fixture
def installed():
    beam_speedups.install()
    yield
    beam_speedups.uninstall()


def _dofns():
    return [
        Plain(),
        Counting(),
        core.CallableWrapperDoFn(lambda x: [x]),
        core.CallableWrapperDoFn(Holder().method),  # process is a bound method with a state param
        core.CallableWrapperDoFn(len),
    ]


def test_answers_match_beams_own():
    expected = [userstate.get_dofn_specs(d) for d in _dofns()]
    args = [core.get_function_arguments(d, "process") for d in _dofns()]
    beam_speedups.install()
    try:
        for _ in range(2):  # a miss, then a hit
            assert [userstate.get_dofn_specs(d) for d in _dofns()] == expected
            assert [core.get_function_arguments(d, "process") for d in _dofns()] == args
    finally:
        beam_speedups.uninstall()
    assert userstate.is_stateful_dofn(Counting()) and userstate.is_stateful_dofn(_dofns()[3])
    assert not userstate.is_stateful_dofn(Plain())


def test_cache_is_used_and_cannot_be_altered(installed):
    a = core.get_function_args_defaults(Plain().process)
    a[0].append("changed")
    assert core.get_function_args_defaults(Plain().process) == (["x", "scale"], [2])
    specs = userstate.get_dofn_specs(Counting())
    specs[0].clear()
    assert userstate.get_dofn_specs(Counting())[0] == {COUNT}
    assert Counting in beam_speedups._SPECS


def test_changed_defaults_are_seen(installed):
    def f(x, y=1):
        return x

    assert core.get_function_args_defaults(f) == (["x", "y"], [1])
    f.__defaults__ = (5,)
    assert core.get_function_args_defaults(f) == (["x", "y"], [5])


def test_stateful_pipeline_runs_the_same(installed):
    with beam.Pipeline() as p:
        out = p | beam.Create([("a", 1), ("a", 2), ("b", 3)]) | beam.ParDo(Counting())
        assert_that(out, equal_to([("a", 1), ("a", 2), ("b", 1)]))  # the count is kept per key
