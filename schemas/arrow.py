"""Versioned Arrow schemas of the output tables (docs/contract.md, docs/outputs.md).

Each table carries ``memsieve.schema`` and ``memsieve.schema_version`` in its metadata; a
reader can check them. Bump the version when a column changes meaning or type.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    meta = {b"memsieve.schema": name.encode(), b"memsieve.schema_version": SCHEMA_VERSION.encode()}
    return pa.schema(fields, metadata=meta)


SAMPLES = _schema(
    "samples",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("meta_json", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_ext", pa.string()),
        pa.field("sha256", pa.string()),
    ],
)

MANIFEST = _schema(
    "manifest",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # ok | failed
        pa.field("decision", pa.string(), nullable=False),  # keep | drop | diversify
        pa.field("reasons", pa.list_(pa.string())),
        pa.field("cluster_id", pa.string()),
        pa.field("cluster_size", pa.int64()),
        pa.field("is_representative", pa.bool_()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("duplication", pa.string()),  # "" | full | partial
        pa.field("trigger_codes", pa.list_(pa.string())),
        pa.field("probe_score", pa.float64()),
    ],
)

FAILURES = _schema(
    "failures",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string()),
        pa.field("url", pa.string()),
    ],
)

CLUSTERS = _schema(
    "clusters",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("embedder", pa.string(), nullable=False),
        pa.field("similarity", pa.float64()),
        pa.field("cluster_size", pa.int64()),
        pa.field("is_representative", pa.bool_()),
    ],
)

NEIGHBOURS = _schema(
    "neighbours",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("embedder", pa.string(), nullable=False),
        pa.field("nn_key", pa.string()),
        pa.field("nn_similarity", pa.float64()),
    ],
)

KEYWORD_TRIGGERS = _schema(
    "triggers_keywords",
    [
        pa.field("keyword", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("n_keyword", pa.int64()),
        pa.field("n_cluster", pa.int64()),
        pa.field("n_both", pa.int64()),
        pa.field("npmi", pa.float64()),
        pa.field("p_value", pa.float64()),
        pa.field("q_value", pa.float64()),
        pa.field("p_cluster_given_keyword", pa.float64()),
        pa.field("p_keyword_given_cluster", pa.float64()),
    ],
)

OBJECT_TRIGGERS = _schema(
    "triggers_objects",
    [
        pa.field("keyword", pa.string(), nullable=False),
        pa.field("object", pa.string(), nullable=False),
        pa.field("n_keyword", pa.int64()),
        pa.field("n_both", pa.int64()),
        pa.field("lift", pa.float64()),
        pa.field("p_value", pa.float64()),
        pa.field("q_value", pa.float64()),
        pa.field("relation", pa.string()),
    ],
)

SCORES = _schema(
    "scores",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("metric", pa.string()),
        pa.field("model", pa.string()),
        pa.field("threshold", pa.float64()),
        pa.field("flagged", pa.bool_()),
    ],
)

DIVERSIFY = _schema(
    "diversify",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("alternatives", pa.list_(pa.string())),
        pa.field("strategy", pa.string()),  # the strategies, comma-separated, in the alternatives' order
        pa.field("alternative_strategies", pa.list_(pa.string())),
        pa.field("gaussian_noise_sigma", pa.float64()),  # GN: applied to text embeddings at training
    ],
)

BLOCKLIST = _schema(
    "blocklist",
    [
        pa.field("url", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("key", pa.string(), nullable=False),
        pa.field("reason", pa.string()),  # the drop reason codes, ";"-joined
        pa.field("category", pa.string()),  # duplicate | memorized | dead_link | unreadable
        pa.field("kept_key", pa.string()),  # duplicates: the key of the copy that was kept
        pa.field("kept_url", pa.string()),  # duplicates: its url
    ],
)

ANNOTATIONS = _schema(
    "annotations",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string()),
        pa.field("failure_stage", pa.string()),
        pa.field("failure_type", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("cluster_id", pa.string()),
        pa.field("cluster_size", pa.int64()),
        pa.field("is_representative", pa.bool_()),
        pa.field("cluster_embedder", pa.string()),
        pa.field("cluster_similarity", pa.float64()),
        pa.field("duplication", pa.string()),
        pa.field("trigger_codes", pa.list_(pa.string())),
        pa.field("probe_score", pa.float64()),
        pa.field("probe_flagged", pa.bool_()),
        pa.field("original_width", pa.int64()),  # before img2dataset resized; 0: unknown
        pa.field("original_height", pa.int64()),
    ],
)

SHARDS = _schema(
    "shards",
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("members", pa.int64()),
        pa.field("keys", pa.int64()),
        pa.field("sidecar_rows", pa.int64()),
        pa.field("truncated", pa.bool_()),
        pa.field("events", pa.list_(pa.string())),
    ],
)

TABLES: dict[str, pa.Schema] = {
    "shards": SHARDS,
    "manifest": MANIFEST,
    "failures": FAILURES,
    "clusters": CLUSTERS,
    "neighbours": NEIGHBOURS,
    "triggers/keywords": KEYWORD_TRIGGERS,
    "triggers/objects": OBJECT_TRIGGERS,
    "scores": SCORES,
    "diversify": DIVERSIFY,
    "blocklist": BLOCKLIST,
    "annotations": ANNOTATIONS,
}


# SampleInfo's columns: the per-shard (or per-reader-batch) info batches that travel between stages
def _info_batch_schema() -> pa.Schema:
    import dataclasses

    from schemas.elements import SampleInfo

    return pa.schema(
        [(f.name, pa.int64() if f.type in ("int", int) else pa.string()) for f in dataclasses.fields(SampleInfo)]
    )


INFO_BATCH = _info_batch_schema()


def info_table(infos) -> pa.Table:
    """SampleInfo objects (or their dicts) -> one info batch, built column by column."""
    infos = list(infos)
    if infos and isinstance(infos[0], dict):
        return pa.Table.from_pylist(infos, schema=INFO_BATCH)
    columns = [pa.array([getattr(i, f.name) for i in infos], type=f.type) for f in INFO_BATCH]
    return pa.Table.from_arrays(columns, schema=INFO_BATCH)


def infos_of(table: pa.Table):
    """An info batch -> SampleInfo objects, in row order."""
    from schemas.elements import SampleInfo

    return [SampleInfo(**r) for r in table.to_pylist()]


def batch_shard(table: pa.Table) -> str:
    """The shard of an info batch (a batch never spans shards)."""
    return table.column("shard")[0].as_py() if table.num_rows else ""
