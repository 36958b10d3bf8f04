"""pipeline.beam_speedups_startup: option views memoised per options object (answers as Beam's own), the
DirectRunner run on the FnApiRunner without a Prism attempt; pipeline.gc_tuning.freeze_at_exit."""

import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions, StandardOptions, TypeOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline import beam_speedups_startup


@pytest.fixture
def views(monkeypatch):
    monkeypatch.delenv("MEMSIEVE_BEAM_STARTUP", raising=False)
    beam_speedups_startup.install_views()
    yield
    beam_speedups_startup.uninstall_views()


def test_views_answer_as_fresh_ones(views):
    flags = ["--runner=DirectRunner", "--experiments=a", "--type_check_strictness=ALL_REQUIRED"]
    options = PipelineOptions(flags)
    first = options.view_as(TypeOptions)
    assert options.view_as(TypeOptions) is first  # kept
    assert first.type_check_strictness == "ALL_REQUIRED"
    assert options.view_as(DebugOptions).experiments == ["a"]
    options.view_as(StandardOptions).runner = "X"  # a write through one view reaches every view
    assert options.view_as(StandardOptions).runner == "X"
    assert options.get_all_options()["runner"] == "X"
    other = PipelineOptions(["--runner=Y"])  # another object: its own views
    assert other.view_as(StandardOptions).runner == "Y"
    assert options.view_as(StandardOptions).runner == "X"
    beam_speedups_startup.uninstall_views()
    fresh = PipelineOptions(flags)
    fresh.view_as(StandardOptions).runner = "X"
    assert fresh.get_all_options() == options.get_all_options()


def test_view_rebuilt_when_the_flags_change(views):
    options = PipelineOptions(["--experiments=a"])
    assert options.view_as(DebugOptions).experiments == ["a"]
    options._flags = ["--experiments=a", "--experiments=b"]
    options._all_options = {}
    assert options.view_as(DebugOptions).experiments == ["a", "b"]


def test_off_leaves_view_as(monkeypatch):
    monkeypatch.setenv("MEMSIEVE_BEAM_STARTUP", "off")
    beam_speedups_startup.install_views()
    options = PipelineOptions([])
    assert options.view_as(TypeOptions) is not options.view_as(TypeOptions)
    assert beam_speedups_startup.in_process_runner(options) is None


@pytest.mark.parametrize(
    "runner, direct",
    [
        ("DirectRunner", True),
        ("SwitchingDirectRunner", True),
        (None, True),  # Beam's default
        ("DataflowRunner", False),
        ("PrismRunner", False),
        ("BundleBasedDirectRunner", False),
        ("pipeline.dask_runner.MemsieveDaskRunner", False),
    ],
)
def test_which_runners_run_in_process(monkeypatch, runner, direct):
    monkeypatch.delenv("MEMSIEVE_BEAM_STARTUP", raising=False)
    options = PipelineOptions([f"--runner={runner}"] if runner else [])
    assert (beam_speedups_startup.in_process_runner(options) is not None) is direct


def test_streaming_is_left_to_beam(monkeypatch):
    monkeypatch.delenv("MEMSIEVE_BEAM_STARTUP", raising=False)
    assert beam_speedups_startup.in_process_runner(PipelineOptions(["--streaming"])) is None


def test_in_process_runner_runs_without_prism(monkeypatch):
    from apache_beam.runners.portability import prism_runner

    monkeypatch.delenv("MEMSIEVE_BEAM_STARTUP", raising=False)

    tried = []

    def no_prism(*args, **kwargs):
        tried.append(True)  # the DirectRunner catches what this raises and falls back
        raise RuntimeError("the Prism runner was tried")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    options = PipelineOptions(["--runner=DirectRunner", "--experiments=memsieve_test"])
    runner = beam_speedups_startup.in_process_runner(options)
    with beam.Pipeline(runner=runner, options=options) as p:
        out = p | beam.Create([3, 1, 2]) | beam.Map(lambda x: (x % 2, x)) | beam.GroupByKey()
        sums = out | beam.MapTuple(lambda k, xs: (k, sum(xs)))
        assert_that(sums, equal_to([(0, 2), (1, 4)]))
    assert not tried
    encoded = runner._provision_info.provision_info.pipeline_options
    assert "memsieve_test" in str(encoded)  # the workers see the run's options, as on the DirectRunner


def test_freeze_at_exit_runs_last():
    """Registered by the CLI: at exit (after handlers registered later), every object is frozen;
    a handler registered before it runs after it and sees the frozen heap."""
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "from pipeline import gc_tuning\n"
        "assert gc_tuning.freeze_at_exit() and not gc_tuning.freeze_at_exit()\n"
        "assert gc.get_freeze_count() == 0\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ".", "MEMSIEVE_GC": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "frozen True"
    env["MEMSIEVE_GC"] = "default"
    out = subprocess.run(
        [sys.executable, "-c", code.replace("assert gc_tuning", "gc_tuning")], capture_output=True, text=True, env=env
    )
    assert out.stdout.strip() == "frozen False"
