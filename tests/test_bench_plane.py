"""scripts/bench_plane.py: its probes count what a stage reads from the runner (bytes, elements)
with Beam's data plane and with memsieve's, and come off again."""

import typing

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import fn_runner

from pipeline import beam_speedups_runner
from scripts import bench_plane


def _run():
    with beam.Pipeline() as p:
        (
            p
            | beam.Create(range(100))
            | "payload" >> beam.Map(lambda i: (i % 5, bytes(1000 + i))).with_output_types(tuple[typing.Any, typing.Any])
            | "group" >> beam.GroupByKey()
            | "sizes" >> beam.MapTuple(lambda k, vs: (k, sum(len(v) for v in vs)))
        )


@pytest.mark.parametrize("patches", [[], ["group", "plane", "sizes"], ["group", "plane", "sizes", "refs"]])
def test_counts_what_the_group_delivers(patches):
    beam_speedups_runner.install_runner(patches)
    bench_plane.install()
    try:
        _run()
        grouped = {name: c for name, c in bench_plane.PCOLLS.items() if "group" in name}
        assert len(grouped) == 1
        ((name, counts),) = grouped.items()
        assert counts["elements"] == 5  # five keys
        if "refs" in patches:  # elements by reference: no bytes cross
            assert counts["bytes"] == 0 and counts["chunks"] == 1
        else:
            assert 100 * 1000 + sum(range(100)) < counts["bytes"] < 110 * 1000 + sum(range(100))
        assert bench_plane.CODERS[name].startswith("kv[")
        stage = next(c for s, c in bench_plane.STAGES.items() if c["in_elements"] == 5)
        assert stage["in_bytes"] == counts["bytes"] and stage["bundles"] == 1 and stage["wall_s"] > 0
        text = bench_plane.report(10)
        assert "group" in text and "bundles" in text
    finally:
        bench_plane.uninstall()
        beam_speedups_runner.uninstall_runner()
    assert not bench_plane.PCOLLS


def test_uninstall_restores_the_runner():
    before = fn_runner.BundleManager.__dict__["process_bundle"]
    bench_plane.install()
    assert fn_runner.BundleManager.__dict__["process_bundle"] is not before
    bench_plane.uninstall()
    assert fn_runner.BundleManager.__dict__["process_bundle"] is before
