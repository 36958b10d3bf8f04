"""The report's table reading inside the pipeline, beside caption diversification.

Everything on ``report/index.html`` except the diversification examples and the run's own figures
(summary, timings, counters) comes from tables that are complete once the per-shard stage has
written: the manifest, annotations and failures, clusters, neighbours, probe scores, triggers.
``ReportParts`` waits for those writers (a count of their written parts, one side-input value)
and then builds that part of the page (``table_parts``: cluster galleries and table, reason and
failure counts, trigger rows; the figures and thumbnails drawn into ``report/``), saving it as
``report/_parts.json``. It runs while the diversification stages still run, instead of after
the pipeline; ``pipeline.report.write_report`` then reads and removes the file, adds what only
the end of the run knows, and renders the page: the same page as building it all at the end.

Only for local output folders (the page of a remote one is rendered locally and uploaded by
``pipeline.job``). What the step holds is the report's own bounded data (``MAX_TABLE`` clusters,
a few rows per table), never per-sample lists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import apache_beam as beam

PARTS = "_parts.json"  # in the report folder: this run's ``table_parts``, read once by write_report


def table_parts(out_dir: str, shard_paths: list[str], config: dict, rdir: str, reuse: bool, max_clusters: int) -> dict:
    """The page's entries read from the tables that exist once the per-shard stage has written
    (manifest, annotations, failures, clusters, neighbours, scores, triggers): all but the
    diversification examples. Draws the figures and thumbnails into ``rdir``. JSON-safe."""
    from pipeline.report import _figures, head_rows, part_tables
    from pipeline.report_clusters import clusters
    from pipeline.report_header import trigger_rows
    from pipeline.report_tables import _failure_table, _reason_table

    found = clusters(out_dir, shard_paths, rdir, max_clusters)
    return dict(
        found=found,
        keywords=trigger_rows(head_rows(out_dir, "triggers/keywords", 20), found["table"]),
        objects=head_rows(out_dir, "triggers/objects", 20),
        reasons=_reason_table(part_tables(out_dir, "manifest", ["decision", "reasons"])),
        figures=_figures(out_dir, rdir, config, reuse),
        failures=_failure_table(part_tables(out_dir, "failures", ["stage", "error_type", "message"])),
    )


def gathered_parts(rdir: str) -> dict | None:
    """This run's ``table_parts`` saved by ``ReportParts`` (None without one); read once: the
    file is removed, so a later page (``memsieve decide``) reads the tables again."""
    path = os.path.join(rdir, PARTS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # unreadable: the page is built from the tables instead
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def _write_parts(_, out_dir: str, shard_paths: list[str], config: dict, ready: int):
    """-> the saved parts file's path (``ready``: the written parts counted, only waited for)."""
    from pipeline.report import _gc_paused
    from pipeline.report_clusters import MAX_CLUSTERS
    from transforms.write import atomic_write_text

    rdir = os.path.join(out_dir, "report")
    os.makedirs(rdir, exist_ok=True)
    try:
        with _gc_paused():  # bounded allocations, as write_report's
            parts = table_parts(out_dir, shard_paths, config, rdir, False, MAX_CLUSTERS)
    except Exception:  # noqa: BLE001 - the run's tables are written: the page is built at the end instead
        logging.getLogger(__name__).warning("report tables not gathered in the run", exc_info=True)
        return
    path = os.path.join(rdir, PARTS)
    atomic_write_text(path, json.dumps(parts, ensure_ascii=False))
    beam.metrics.Metrics.counter("report", "gathered").inc()  # run.json: the page's tables were read in the run
    yield path


def add_report_parts(p: beam.Pipeline, cfg, read: dict, out_dir: str):
    """Wire ``ReportParts`` after every writer registered so far (``_memsieve_written``: the
    per-shard stage, clusters, neighbours, scores, triggers); returns its written path, or None
    where the page is built at the end (report off, a remote output folder)."""
    from transforms import fsio

    written = p.__dict__.get("_memsieve_written", [])
    if not cfg.output.report or fsio.is_remote(out_dir) or not written:
        return None
    ready = tuple(written) | "ReportInputs" >> beam.Flatten() | "ReportReady" >> beam.combiners.Count.Globally()
    return (
        p
        | "ReportStart" >> beam.Create([None])
        | "ReportParts"
        >> beam.FlatMap(
            _write_parts,
            out_dir=out_dir,
            shard_paths=list(read["input"].get("shards", [])),
            config=cfg.model_dump(mode="json"),
            ready=beam.pvalue.AsSingleton(ready),
        )
    )
