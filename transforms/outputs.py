"""Multi-output ParDos that every runner can execute.

Beam's DaskRunner (2.77) merges a ParDo's tagged outputs into one bag, so ``with_outputs``
returns wrong elements there. When the driver selects a runner like that, ``multi_output``
wraps the DoFn so it emits ``(tag, value)`` pairs and splits them with one filter per tag;
elsewhere it is a plain ``with_outputs``.
"""

from __future__ import annotations

import apache_beam as beam

_SPLIT_BY_FILTER = False


def split_by_filter(enabled: bool) -> None:
    """Set by the driver before the graph is built (runners without tagged-output support)."""
    global _SPLIT_BY_FILTER
    _SPLIT_BY_FILTER = enabled


def runner_needs_split(runner: str) -> bool:
    """Beam's own Dask runner; memsieve's (``pipeline.dask_runner``) keeps tagged outputs apart."""
    return "dask" in runner.lower() and not runner.startswith("pipeline.")


class _AsTagged(beam.DoFn):
    def __init__(self, inner, main: str):
        self.inner = inner if isinstance(inner, beam.DoFn) else beam.transforms.core.CallableWrapperDoFn(inner)
        self.main = main

    def setup(self):
        self.inner.setup()

    def start_bundle(self):
        self.inner.start_bundle()

    def process(self, element, *args, **kwargs):
        for out in self.inner.process(element, *args, **kwargs) or ():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield out.tag, out.value
            else:
                yield self.main, out

    def finish_bundle(self):
        self.inner.finish_bundle()

    def teardown(self):
        self.inner.teardown()


def multi_output(pcoll, label: str, fn, tags: list[str], main: str, *args, **kwargs) -> dict:
    """``pcoll | label >> ParDo(fn, *args, **kwargs).with_outputs(*tags, main=main)`` as a dict."""
    if not _SPLIT_BY_FILTER:
        dofn = fn if isinstance(fn, beam.DoFn) else beam.transforms.core.CallableWrapperDoFn(fn)
        res = pcoll | label >> beam.ParDo(dofn, *args, **kwargs).with_outputs(*tags, main=main)
        return {t: res[t] for t in [main, *tags]}
    tagged = pcoll | label >> beam.ParDo(_AsTagged(fn, main), *args, **kwargs)
    return {
        t: tagged | f"{label}_{t}" >> beam.FlatMap(lambda kv, t=t: [kv[1]] if kv[0] == t else []) for t in [main, *tags]
    }
