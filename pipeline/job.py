"""Run a job: resolve inputs, prepare the output folder, run the Beam graph, write run.json."""

from __future__ import annotations

import logging
import os
import shutil
import time

from pipeline.config import ConfigError, JobConfig

log = logging.getLogger(__name__)

# tables a run owns; they are cleared at the start so no stale part survives (caches are kept)
RUN_TABLES = [
    "manifest",
    "annotations",
    "failures",
    "clusters",
    "neighbours",
    "triggers/keywords",
    "triggers/objects",
    "scores",
    "diversify",
    "blocklist",
    "shards",
]
RUN_FILES = ["run.json", "blocklist.txt"]


class RunFailed(RuntimeError):
    """The run finished but must not pass as done (exit 1)."""


def resolve_input(path: str) -> tuple[str, list[str]]:
    """-> (format, paths). A LAION-layout folder, a folder of shards, or a glob of .tar files."""
    from apache_beam.io.filesystems import FileSystems

    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "img_emb")):
            return "laion_embeddings", [path]
        path = os.path.join(path, "*.tar")
    try:
        matched = FileSystems.match([path])[0].metadata_list
    except Exception as exc:  # an unknown scheme or a bad pattern
        raise ConfigError(f"input.path: cannot list {path!r}: {exc}") from None
    shards = sorted(m.path for m in matched if m.path.endswith(".tar"))
    if not shards:
        raise ConfigError(f"input.path: no .tar shards match {path!r}")
    return "webdataset", shards


def _absolute_model_paths(cfg: JobConfig) -> JobConfig:
    """Local model and caption files named relative to the job's working folder -> absolute."""
    probe = cfg.probe
    update = {f: os.path.abspath(getattr(probe, f)) for f in ("model", "reference_captions")
              if getattr(probe, f) and os.path.exists(getattr(probe, f))}
    return cfg.model_copy(update={"probe": probe.model_copy(update=update)}) if update else cfg


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def prepare_output(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    report = os.path.join(out_dir, "report")
    if os.path.isdir(report):  # a new run's report starts empty (a re-decide keeps the thumbnails)
        shutil.rmtree(report)
    for name in RUN_FILES:
        target = os.path.join(out_dir, name)
        if os.path.exists(target):
            os.remove(target)
    for table in RUN_TABLES + ["filtered"]:
        target = os.path.join(out_dir, table)
        if os.path.isdir(target):
            shutil.rmtree(target)


def beam_options(cfg: JobConfig, beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={cfg.run.runner}")
    return PipelineOptions(args, save_main_session=False)


def _one_line(url: str) -> str:
    """Control characters and line separators percent-encoded: one URL is one line of blocklist.txt."""
    return "".join(f"%{ord(c):02X}" if ord(c) < 32 or ord(c) == 127 or c in "\x85\u2028\u2029" else c for c in url)


def write_blocklist_txt(out_dir: str) -> int:
    from transforms.write import atomic_write_text, read_table

    table = read_table(os.path.join(out_dir, "blocklist"))
    urls = sorted({_one_line(u) for u in (table.column("url").to_pylist() if table is not None else []) if u})
    atomic_write_text(os.path.join(out_dir, "blocklist.txt"), "".join(u + "\n" for u in urls))
    return len(urls)


def run_job(cfg: JobConfig, beam_args: list[str] | None = None) -> dict:
    """Run the job to completion; returns the run.json content. Raises RunFailed past the cap."""
    from pipeline.graph import reader
    from pipeline.preflight import preflight

    fmt, inputs = resolve_input(cfg.input.path)
    if cfg.input.format != "auto" and cfg.input.format != fmt:
        raise ConfigError(f"input.format: {cfg.input.format} given, but {cfg.input.path!r} looks like {fmt}")
    reader(fmt).check(cfg)  # settings the layout cannot honour
    preflight(cfg, beam_args)  # everything checkable is checked before the output is touched
    cfg = _absolute_model_paths(cfg)
    out_dir = _absolute(cfg.output.dir)  # workers of a distributed runner may run elsewhere
    inputs = [_absolute(p) for p in inputs]
    prepare_output(out_dir)
    return _run(cfg, fmt, inputs, out_dir, beam_args or [])


def _run(cfg: JobConfig, fmt: str, inputs: list[str], out_dir: str, beam_args: list[str]) -> dict:
    """One run path for every input layout: its reader, then the shared graph."""
    import apache_beam as beam

    from pipeline import runinfo
    from pipeline.graph import build_graph, read_input

    started = time.time()
    log.info("job %s: %s input, %d paths -> %s", cfg.name, fmt, len(inputs), out_dir)
    from transforms.outputs import runner_needs_split, split_by_filter

    options = beam_options(cfg, beam_args)
    split_by_filter(runner_needs_split(str(options.get_all_options().get("runner") or "")))
    pipeline = beam.Pipeline(options=options)
    read = read_input(pipeline, cfg, fmt, inputs, out_dir)
    build_graph(pipeline, cfg, read, out_dir)
    from pipeline import progress

    with progress.live(read["input"]["n_shards"], ["samples decoded"]):
        result = pipeline.run()
        result.wait_until_finish()
    pipeline_s = time.time() - started
    post = time.time()
    n_blocked = write_blocklist_txt(out_dir)
    counts = runinfo.table_counts(out_dir, RUN_TABLES)
    info = {
        "job": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "versions": runinfo.package_versions(),
        "input": read["input"],
        "counters": runinfo.beam_counters(result),
        "outputs": dict(counts, blocklist_urls=n_blocked),
        "timings_s": {"pipeline": round(pipeline_s, 3)},
    }
    info["summary"] = _summary(out_dir, counts)
    if cfg.output.filtered_shards and fmt == "webdataset":
        from transforms.filtered_shards import write_filtered_shards

        info["outputs"]["filtered_samples"] = write_filtered_shards(out_dir, inputs, cfg.diversify)
    _maybe_report(cfg, out_dir, info)
    info["timings_s"]["post"] = round(time.time() - post, 3)
    info["timings_s"]["total"] = round(time.time() - started, 3)
    info["checksums"] = runinfo.checksums(out_dir, RUN_TABLES)
    runinfo.write_run_json(os.path.join(out_dir, "run.json"), info)
    _check_failure_ratio(cfg, info["summary"])
    log.info("job %s done in %.1f s: %s", cfg.name, info["timings_s"]["total"], info["summary"])
    return info


def _summary(out_dir: str, counts: dict) -> dict:
    from collections import Counter

    from transforms.write import read_table

    manifest = read_table(os.path.join(out_dir, "manifest"))
    failures = read_table(os.path.join(out_dir, "failures"))
    decisions = Counter(manifest.column("decision").to_pylist()) if manifest is not None else Counter()
    status = Counter(manifest.column("status").to_pylist()) if manifest is not None else Counter()
    types = Counter(failures.column("error_type").to_pylist()) if failures is not None else Counter()
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
    write_report(out_dir, info, reuse_figures)
