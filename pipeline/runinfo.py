"""``run.json``: resolved config, versions, counters per stage, timings, input/output counts."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata

PACKAGES = (
    "memsieve",
    "apache-beam",
    "pyarrow",
    "numpy",
    "pillow",
    "torch",
    "open_clip_torch",
    "faiss-cpu",
    "diffusers",
    "transformers",
    "spacy",
    "webdataset",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    try:
        from memsieve import __version__

        out["memsieve"] = __version__  # the code that ran, not pip's record of an older install
    except ImportError:
        pass
    for name in PACKAGES:
        if name in out:
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def beam_counters(result) -> dict[str, dict[str, int]]:
    """Beam metrics -> {namespace: {name: value}} (counters summed, distributions as sums/counts)."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, dict] = {}
    try:
        queried = result.metrics().query(MetricsFilter())
    except Exception:  # some runners do not report metrics
        return out
    for c in queried.get("counters", []):
        ns = out.setdefault(c.key.metric.namespace, {})
        name = c.key.metric.name
        ns[name] = ns.get(name, 0) + int(c.committed if c.committed is not None else c.attempted or 0)
    for d in queried.get("distributions", []):
        ns = out.setdefault(d.key.metric.namespace, {})
        value = d.committed if d.committed is not None else d.attempted
        if value is not None:
            ns[d.key.metric.name + "_sum"] = ns.get(d.key.metric.name + "_sum", 0) + int(value.sum)
            ns[d.key.metric.name + "_count"] = ns.get(d.key.metric.name + "_count", 0) + int(value.count)
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def table_counts(out_dir: str, tables: list[str]) -> dict[str, int]:
    import pyarrow.parquet as pq

    from transforms import fsio

    counts = {}
    for table in tables:
        folder = fsio.join(out_dir, table)
        parts = [p for p in fsio.listdir(folder) if p.endswith(".parquet")]
        if not parts and not fsio.isdir(folder):
            continue
        total = 0
        for p in parts:
            with fsio.open_input(fsio.join(folder, p)) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        counts[table] = total
    return counts


def checksums(out_dir: str, tables: list[str]) -> dict[str, str]:
    """sha256 per output file, so two runs can be compared for determinism."""
    from transforms import fsio

    out = {}
    for table in tables:
        folder = fsio.join(out_dir, table)
        for name in fsio.listdir(folder):
            if name.endswith(".parquet"):
                out[f"{table}/{name}"] = hashlib.sha256(fsio.read_bytes(fsio.join(folder, name))).hexdigest()
    return out


def write_run_json(path: str, info: dict) -> None:
    from schemas.run_summary import RUN_SUMMARY_VERSION, RunSummary
    from transforms.write import atomic_write_text

    info = dict(info, argv=sys.argv[1:], schema_version=RUN_SUMMARY_VERSION)
    RunSummary.model_validate(info)  # a malformed summary is a bug: fail loudly
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
