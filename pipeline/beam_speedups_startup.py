"""Beam's fixed costs before the first bundle, cut for an in-process run: option views memoised
(``views``) and the DirectRunner's Prism attempt skipped (``runner``).

- ``views``: ``PipelineOptions.view_as(cls)`` builds an ``argparse`` parser for ``cls``'s
  options and parses the flags again on every call, and Beam calls it ~1,200 times while the
  LAION full graph is built (each ``apply``, each type-consistency check): 1.8 of 3.0 s of graph
  construction under cProfile. ``install_views()`` keeps the view per (options object, class);
  a view holds nothing of its own (its values live in the options' shared ``_all_options``,
  ``__setattr__`` accepts nothing else), so a kept view answers exactly as a fresh one. It is
  rebuilt when the options object's flags or value store are no longer the ones it was made
  from. Options objects are held weakly.
- ``runner``: Beam's ``DirectRunner`` (memsieve's default, ``SwitchingDirectRunner``) first
  translates the whole graph for Prism (every DoFn pickled and bz2-compressed) and tries to
  download the Prism binary, and only then runs it in-process on the ``FnApiRunner``: offline,
  half a second spent on a failed attempt; online, the job would run on a runner none of
  memsieve's in-process patches (``pipeline.beam_speedups``) apply to. ``in_process_runner``
  gives the ``FnApiRunner`` the DirectRunner falls back to (pipeline options in its provision
  info, as Beam sets them), for a run whose runner is the DirectRunner; any other runner
  (Dataflow, Flink, Dask, ``--runner=PrismRunner``) is left to Beam.

``MEMSIEVE_BEAM_STARTUP=off`` leaves Beam as it is.
"""

from __future__ import annotations

import os
import weakref

DIRECT_RUNNERS = ("directrunner", "switchingdirectrunner", "direct", "switchingdirect")
_ORIGINAL_VIEW_AS = None
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # options -> {cls: view}


def enabled() -> bool:
    return os.environ.get("MEMSIEVE_BEAM_STARTUP", "").strip().lower() not in ("off", "0", "none")


def cached_view_as(self, cls):
    """``PipelineOptions.view_as``, one view per (options object, class)."""
    try:
        views = _VIEWS.setdefault(self, {})
    except TypeError:  # not weakly referenceable or not hashable: as Beam does
        return _ORIGINAL_VIEW_AS(self, cls)
    view = views.get(cls)
    if view is None or view._flags is not self._flags or view._all_options is not self._all_options:
        view = _ORIGINAL_VIEW_AS(self, cls)
        views[cls] = view
    return view


def install_views() -> None:
    """Route ``PipelineOptions.view_as`` through the per-object cache (idempotent)."""
    global _ORIGINAL_VIEW_AS
    from apache_beam.options.pipeline_options import PipelineOptions

    if not enabled():
        return
    if _ORIGINAL_VIEW_AS is None:
        _ORIGINAL_VIEW_AS = PipelineOptions.view_as
    PipelineOptions.view_as = cached_view_as


def uninstall_views() -> None:
    from apache_beam.options.pipeline_options import PipelineOptions

    if _ORIGINAL_VIEW_AS is not None:
        PipelineOptions.view_as = _ORIGINAL_VIEW_AS
    _VIEWS.clear()


def is_direct(runner: str) -> bool:
    """True for the names that give Beam's SwitchingDirectRunner (as ``--runner`` or ``run.runner``)."""
    name = (runner or "DirectRunner").strip().lower()
    return name in DIRECT_RUNNERS or name == "apache_beam.runners.direct.direct_runner.directrunner"


def in_process_runner(options):
    """-> the ``FnApiRunner`` for options naming the DirectRunner (None: let Beam choose)."""
    if not enabled():
        return None
    from apache_beam.options.pipeline_options import StandardOptions

    std = options.view_as(StandardOptions)
    if std.streaming or not is_direct(str(std.runner or "")):
        return None
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class InProcessRunner(fn_runner.FnApiRunner):
        """The FnApiRunner with the run's pipeline options in its provision info, as the
        DirectRunner builds it once the pipeline is final."""

        def run_pipeline(self, pipeline, options):
            from apache_beam.portability.api import beam_provision_api_pb2
            from apache_beam.runners.portability.portable_runner import JobServiceHandle

            encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
            info = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
            self._provision_info = fn_runner.ExtendedProvisionInfo(info)
            return super().run_pipeline(pipeline, options)

    return InProcessRunner()
