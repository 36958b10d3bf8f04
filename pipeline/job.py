"""Run a job: list the inputs, claim the output folder, run the Beam graph into a staging folder,
write run.json there and commit it (``pipeline.outdir``)."""

from __future__ import annotations

import logging
import os
import time

from pipeline.config import ConfigError, JobConfig
from pipeline.outdir import TABLES as RUN_TABLES  # the tables a run owns (committed together)

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run finished but must not pass as done (exit 1)."""


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SIDECAR_SUFFIXES = (".parquet", "_stats.json", ".json")


def list_input(path: str) -> tuple[str, list[str], dict]:
    """-> (format, paths, skipped). A LAION-layout folder, a folder of shards, or a glob (brace
    ranges like ``{00000..09999}`` expand). Every matched file is a shard (.tar, .tar.gz, .tgz,
    any case) or named in ``skipped`` with the reason."""
    from transforms import fsio

    try:
        if fsio.isdir(path):
            if fsio.isdir(fsio.join(path, "img_emb")):
                return "laion_embeddings", [path], {}
            path = fsio.join(path, "*")
        matched = fsio.match(path)
    except Exception as exc:  # an unknown scheme, a missing driver, no credentials
        raise ConfigError(f"input.path: cannot list {path!r}: {type(exc).__name__}: {exc}") from None
    shards, skipped, sidecars = [], {}, 0
    for p, kind in matched:
        lower = p.lower()
        if kind == "dir":
            continue
        if lower.endswith(SHARD_SUFFIXES):  # a FIFO named .tar too: the reader reports it, never opens it
            shards.append(p)
        elif kind != "file":
            skipped[p] = "not a regular file (a FIFO, device or socket)"
        elif lower.endswith(SIDECAR_SUFFIXES):
            sidecars += 1
        else:
            skipped[p] = "not a .tar, .tar.gz or .tgz shard"
    for p, why in skipped.items():
        log.warning("input: skipped %s: %s", p, why)
    if not shards:
        raise ConfigError(f"input.path: no .tar, .tar.gz or .tgz shards match {path!r}")
    return "webdataset", shards, {"sidecars_seen": sidecars, "files": skipped}


def _absolute_model_paths(cfg: JobConfig) -> JobConfig:
    """Local model and caption files named relative to the job's working folder -> absolute."""
    probe = cfg.probe
    update = {
        f: os.path.abspath(getattr(probe, f))
        for f in ("model", "reference_captions")
        if getattr(probe, f) and os.path.exists(getattr(probe, f))
    }
    return cfg.model_copy(update={"probe": probe.model_copy(update=update)}) if update else cfg


def _absolute(path: str) -> str:
    from transforms import fsio

    return fsio.absolute(path)


def _shared_dirs(cfg: JobConfig, out_dir: str) -> JobConfig:
    """The cache and persisted embeddings live in OUT (shared by runs), not in a run's staging."""
    from transforms import fsio

    run = cfg.run.model_copy(update={"cache_dir": cfg.run.cache_dir or fsio.join(out_dir, "cache")})
    emb = cfg.dedup.embeddings_dir or fsio.join(out_dir, "embeddings")
    dedup = cfg.dedup.model_copy(update={"embeddings_dir": emb})
    return cfg.model_copy(update={"run": run, "dedup": dedup})


def beam_options(cfg: JobConfig, beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import dask_runner

    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={cfg.run.runner}")
    # Beam's DaskRunner recomputes a side input's upstream per task: ours materialises it once
    args = [f"--runner={dask_runner.RUNNER_PATH}" if _is_dask_flag(a) else a for a in args]
    return PipelineOptions(args, save_main_session=False)


def _is_dask_flag(arg: str) -> bool:
    from pipeline import dask_runner

    return arg.startswith("--runner=") and dask_runner.is_dask(arg.split("=", 1)[1])


def write_blocklist_txt(out_dir: str) -> int:
    from pipeline.blocklist import write_blocklist_txt as write

    return write(out_dir)


def run_job(cfg: JobConfig, beam_args: list[str] | None = None) -> dict:
    """Run the job to completion and commit it into OUT; returns the run.json content. Raises
    RunFailed past the failure cap (OUT keeps the previous run) and ConfigError (exit 2) for an
    output that is unsafe to write, before anything is written."""
    from pipeline import outdir
    from pipeline.graph import reader
    from pipeline.preflight import preflight

    fmt, inputs, skipped = list_input(cfg.input.path)
    if cfg.input.format != "auto" and cfg.input.format != fmt:
        raise ConfigError(f"input.format: {cfg.input.format} given, but {cfg.input.path!r} looks like {fmt}")
    reader(fmt).check(cfg)  # settings the input layout cannot honour
    preflight(cfg, beam_args)  # everything checkable is checked before the output is touched
    cfg = _absolute_model_paths(cfg)
    out_dir = _absolute(cfg.output.dir)  # workers of a distributed runner may run elsewhere
    inputs = [_absolute(p) for p in inputs]
    with outdir.private_tmpdir(), outdir.claim(out_dir, inputs) as (run_id, stage):
        cfg = _shared_dirs(cfg, out_dir)
        info = _run(cfg, fmt, inputs, stage, beam_args or [], {"run_id": run_id, "skipped": skipped})
        outdir.commit(out_dir, stage)
    return info


def _run(cfg: JobConfig, fmt: str, inputs: list[str], out_dir: str, beam_args: list[str], meta: dict) -> dict:
    """One run path for every input layout: its reader, then the shared graph, with every output
    in ``out_dir`` (the run's staging folder); run.json is written there last, or, past the
    failure cap, diagnostics instead (RunFailed)."""
    import apache_beam as beam

    from pipeline import beam_speedups, beam_speedups_startup, gc_tuning, heap, outdir, runinfo
    from pipeline.graph import build_graph, read_input
    from transforms import fsio

    started = time.time()
    beam_speedups.install()  # Beam in-process: memoised DoFn inspection, no data-plane copies (MEMSIEVE_BEAM_SPEEDUPS)
    beam_speedups_startup.install_views()  # Beam's option views memoised (MEMSIEVE_BEAM_STARTUP)
    heap.configure()  # freed stage buffers leave the process (in-process runners)
    log.info("job %s: %s input, %d paths -> %s", cfg.name, fmt, len(inputs), out_dir)
    from transforms.outputs import runner_needs_split, split_by_filter

    options = beam_options(cfg, beam_args)
    split_by_filter(runner_needs_split(str(options.get_all_options().get("runner") or "")))
    # the DirectRunner's FnApiRunner without its Prism attempt first (None: Beam's choice)
    pipeline = beam.Pipeline(runner=beam_speedups_startup.in_process_runner(options), options=options)
    read = read_input(pipeline, cfg, fmt, inputs, out_dir)
    build_graph(pipeline, cfg, read, out_dir)
    from pipeline import progress
    from transforms import spill

    try:
        with progress.live(read["input"]["n_shards"]):
            gc_tuning.configure()  # fewer collections, none through the modules and the graph (MEMSIEVE_GC)
            result = pipeline.run()
            result.wait_until_finish()
    except BaseException:
        gc_tuning.restore()
        fsio.remove(spill.folder_of(out_dir))  # vectors the search stages read (transforms/spill.py)
        raise
    gc_tuning.restore()
    spilled = _remove_later(spill.folder_of(out_dir))  # ~1 GB at 1M rows: unlinked while the tables are summarised
    pipeline_s = time.time() - started
    outdir.fault_point("tables")
    post = time.time()
    from pipeline.blocklist import urls_published

    counters = runinfo.beam_counters(result)
    n_blocked = urls_published(counters)  # blocklist.txt written inside the run (pipeline.blocklist)
    if n_blocked is None:
        n_blocked = write_blocklist_txt(out_dir)
    counts = runinfo.table_counts(out_dir, RUN_TABLES)
    info = {
        "job": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "versions": runinfo.package_versions(),
        "input": dict(read["input"], skipped=meta["skipped"]),
        "run_id": meta["run_id"],
        "counters": counters,
        "outputs": dict(counts, blocklist_urls=n_blocked),
        "timings_s": {"pipeline": round(pipeline_s, 3)},
        "stages": progress.stage_report(result),
    }
    info["summary"] = _summary(out_dir, counts)
    if cfg.output.filtered_shards and fmt == "webdataset":
        from transforms.filtered_shards import write_filtered_shards

        with progress.timed(info, "filtered_shards"):
            info["outputs"]["filtered_samples"] = write_filtered_shards(out_dir, inputs, cfg.diversify)
    with progress.timed(info, "report"):
        _maybe_report(cfg, out_dir, info)
    outdir.fault_point("report")
    info["timings_s"]["post"] = round(time.time() - post, 3)
    info["timings_s"]["total"] = round(time.time() - started, 3)
    info["checksums"] = runinfo.checksums(out_dir, RUN_TABLES)
    spilled.join()  # gone before run.json, diagnostics and the commit
    try:
        _check_failure_ratio(cfg, info["summary"])
    except RunFailed as exc:
        path = outdir.write_diagnostics(out_dir, info, str(exc))
        raise RunFailed(f"{exc} (the previous run in the output folder is kept; diagnostics: {path})") from None
    runinfo.write_run_json(fsio.join(out_dir, "run.json"), info)
    log.info("job %s done in %.1f s: %s", cfg.name, info["timings_s"]["total"], info["summary"])
    return info


def _remove_later(path: str):
    """Delete ``path`` (a folder tree) on a thread, started now; -> the thread (join it before the
    folder that holds ``path`` is committed). Unlinking releases the GIL: the post-run steps go on."""
    import threading

    from transforms import fsio

    thread = threading.Thread(target=fsio.remove, args=(path,), name="memsieve-remove-spill", daemon=True)
    thread.start()
    return thread


def _value_counts(table_dir: str, *columns: str) -> list[dict]:
    """{value: rows} of each of ``columns`` of a table folder, one read of those columns per part
    (not the whole table)."""
    from collections import Counter

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transforms import fsio

    out = [Counter() for _ in columns]
    for part in sorted(p for p in fsio.listdir(table_dir) if p.endswith(".parquet")):
        with fsio.open_input(fsio.join(table_dir, part)) as f:
            table = pq.read_table(f, columns=list(columns))
        for counts, column in zip(out, columns, strict=True):
            for item in pc.value_counts(table.column(column)).to_pylist():
                counts[item["values"]] += item["counts"]
    return [dict(c) for c in out]


def _summary(out_dir: str, counts: dict) -> dict:
    from transforms import fsio

    decisions, status = _value_counts(fsio.join(out_dir, "manifest"), "decision", "status")
    (types,) = _value_counts(fsio.join(out_dir, "failures"), "error_type")
    return {
        "keys": counts.get("manifest", 0),
        "ok": status.get("ok", 0),
        "failed": status.get("failed", 0),
        "decisions": dict(sorted(decisions.items())),
        "failures_by_type": dict(sorted(types.items())),
    }


def _check_failure_ratio(cfg: JobConfig, summary: dict) -> None:
    keys = summary["keys"]
    ratio = summary["failed"] / keys if keys else 1.0
    if keys == 0 or ratio > cfg.run.max_failure_ratio:
        raise RunFailed(
            f"{summary['failed']} of {keys} samples failed ({ratio:.1%}), above run.max_failure_ratio="
            f"{cfg.run.max_failure_ratio}: a systematic problem, not bad samples; see failures/ "
            f"(by type: {summary['failures_by_type']})"
        )


def _maybe_report(cfg: JobConfig, out_dir: str, info: dict, reuse_figures: bool = False) -> None:
    if not cfg.output.report:
        return
    try:
        from pipeline.report import write_report
    except ImportError:
        return
    from transforms import fsio

    if not fsio.is_remote(out_dir):
        write_report(out_dir, info, reuse_figures)
        return
    import shutil
    import tempfile

    local = tempfile.mkdtemp(prefix="memsieve-report-")
    try:  # the page is rendered locally (matplotlib, PIL write files), then uploaded
        write_report(out_dir, info, reuse_figures, report_dir=local)
        fsio.put_tree(local, fsio.join(out_dir, "report"))
    finally:
        shutil.rmtree(local, ignore_errors=True)
