"""The reader of LAION's precomputed-embedding layout: the same elements as ``ProcessShards``.

``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet`` (``transforms.laion_files``). Work
items are row ranges (metadata row groups); each yields, per batch of a few thousand rows:

- one table of ``SampleInfo`` columns (``schemas.arrow.INFO_BATCH``), a row per good row (key,
  shard = the metadata file, url, caption, sizes and original sizes from the metadata; every
  other column in ``meta_json``; no pixels, so no pixel digest),
- ``Failure`` per bad row (no usable vector: NaN, infinite or zero; no caption; a vector without a
  metadata row or the reverse) so every row's key still reaches the manifest,
- one vector batch ``(keys, float16 unit vectors)`` of the good rows, for ``VectorEdges``.

Keys repeated across files are reported as ``duplicate_key`` failures (the first file keeps the
key), as the webdataset reader does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from pipeline import progress
from schemas.arrow import info_table
from schemas.elements import Failure, SampleInfo
from transforms.key_batches import RepeatedKeys, n_buckets
from transforms.laion_files import LaionFile, RowRange, VectorSource, open_file

VECTOR_BATCH = 4096  # rows per vector element (16 MB at 1024 dims)
EMBEDDER = "clip"  # LAION's img_emb are CLIP image embeddings
FIELDS = ("key", "url", "caption", "sha256", "width", "height", "original_width", "original_height")
MIN_NORM = 1e-6


@dataclasses.dataclass(frozen=True)
class LaionSettings:
    require_caption: bool = True
    max_caption_bytes: int = 16 * 1024
    batch_rows: int = VECTOR_BATCH


def _int(value) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 0
    return int(f) if math.isfinite(f) and f > 0 else 0


def _text(value) -> str:
    return "" if value is None else str(value)


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def synthetic_key(shard: str, row: int) -> str:
    return f"{shard}:{row:09d}"


class ReadRangeFn(beam.DoFn):
    """RowRange -> SampleInfo tables (main, one per batch); tagged "failures", "vectors", "keys"
    (one list of (key, (shard, row)) per batch)."""

    def __init__(self, settings: LaionSettings):
        self.settings = settings

    def setup(self):
        self.vectors = VectorSource()
        self.rows_read = beam.metrics.Metrics.counter("read", "laion_rows")

    def process(self, item: RowRange) -> Iterator:
        seen: set[str] = set()  # keys of this range (a row group): a repeat is dropped here
        for columns, start, n in self._metadata_batches(item):
            yield from self._batch(item.file, columns, start, n, seen)
            self.rows_read.inc(n)
            progress.advance("samples decoded", n)
        if item.stop >= item.file.rows:  # the file's last range
            progress.advance("shards")

    def _metadata_batches(self, item: RowRange) -> Iterator[tuple[dict, int, int]]:
        """-> (columns as Python lists, first row, rows) per batch; columns empty past the metadata."""
        size = self.settings.batch_rows
        if item.row_groups:
            import pyarrow.parquet as pq

            pos = item.start
            with open_file(item.file.metadata) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=size, row_groups=list(item.row_groups)):
                    yield {name: batch.column(name).to_pylist() for name in batch.schema.names}, pos, batch.num_rows
                    pos += batch.num_rows
            return
        for s in range(item.start, item.stop, size):
            yield {}, s, min(item.stop, s + size) - s

    def _batch(self, lf: LaionFile, columns: dict, start: int, n: int, seen: set[str]) -> Iterator:
        stop_vec = min(start + n, lf.n_vectors)
        vecs = self.vectors.rows(lf.npy, start, stop_vec) if stop_vec > start else np.empty((0, lf.dim), np.float32)
        x = vecs.astype(np.float32)
        norms = np.linalg.norm(x, axis=1) if len(x) else np.empty(0, np.float32)
        good_vec = np.isfinite(norms) & (norms > MIN_NORM)
        others = sorted(c for c in columns if c not in FIELDS)
        keys, rows, infos, where = [], [], [], []
        good, n_vec = good_vec.tolist(), len(x)
        for i in range(n):
            row = start + i
            info_or_failure = self._row(lf, columns, others, i, row, i < n_vec, i < n_vec and good[i])
            key = info_or_failure.key
            if key in seen:  # repeated inside this range: the first row keeps it
                msg = f"row {row}: the key repeats in {lf.shard}"
                yield beam.pvalue.TaggedOutput("failures", Failure(key, lf.shard, "read", "duplicate_key", msg))
                continue
            seen.add(key)
            where.append((key, (lf.shard, row)))
            if isinstance(info_or_failure, Failure):
                yield beam.pvalue.TaggedOutput("failures", info_or_failure)
                continue
            infos.append(info_or_failure)
            keys.append(key)
            rows.append(i)
        if where:
            yield beam.pvalue.TaggedOutput("keys", where)
        if infos:  # one info batch per reader batch, not one element per row
            yield info_table(infos)
        if keys:
            sel = np.asarray(rows)
            # float16, as the cell search stores them (ann_edges._columnar): half the bytes in flight
            unit = (x[sel] / norms[sel, None]).astype(np.float16)
            yield beam.pvalue.TaggedOutput("vectors", (keys, unit))

    def _row(self, lf: LaionFile, columns: dict, others: list[str], i: int, row: int, has_vec: bool, good: bool):
        s = self.settings
        key = _text(_cell(columns, "key", i)).strip() or synthetic_key(lf.shard, row)
        url, caption = _text(_cell(columns, "url", i)), _text(_cell(columns, "caption", i)).strip()
        sha = _text(_cell(columns, "sha256", i))

        def fail(error_type: str, message: str, stage: str = "read") -> Failure:
            return Failure(key, lf.shard, stage, error_type, message[:500], url, caption, sha)

        why = "; ".join(lf.problems) or lf.shard
        if not columns:
            return fail(
                "row_count_mismatch" if lf.metadata_ok else "missing_metadata", f"row {row}: no metadata ({why})"
            )
        if not has_vec:
            return fail("row_count_mismatch" if lf.npy_ok else "missing_vector", f"row {row}: no embedding ({why})")
        status = _cell(columns, "status", i)
        if status not in (None, "", "success"):
            return fail(_text(status), _text(_cell(columns, "error_message", i)) or _text(status), "download")
        if not good:
            return fail("bad_vector", f"row {row}: the embedding is NaN, infinite or zero")
        if len(caption.encode("utf-8", "replace")) > s.max_caption_bytes:
            return fail("caption_too_long", f"caption is over {s.max_caption_bytes} bytes")
        if s.require_caption and not caption:
            return fail("missing_caption", "no caption in the metadata row")
        meta = {c: _json_value(columns[c][i]) for c in others}
        return SampleInfo(
            key=key,
            shard=lf.shard,
            url=url,
            caption=caption,
            sha256=sha,
            pixel_sha256="",
            width=_int(_cell(columns, "width", i)),
            height=_int(_cell(columns, "height", i)),
            meta_json=json.dumps(meta, sort_keys=True, default=str) if meta else "{}",
            original_width=_int(_cell(columns, "original_width", i)),
            original_height=_int(_cell(columns, "original_height", i)),
        )


def _cell(columns: dict, name: str, i: int):
    col = columns.get(name)
    return None if col is None else col[i]


def repeated_keys(item) -> Iterator[Failure]:
    """(key, [(shard, row)]) -> a ``duplicate_key`` failure for every occurrence after the first."""
    key, where = item
    ordered = sorted(set(where))
    for shard, row in ordered[1:]:
        first = ordered[0]
        yield Failure(
            key, shard, "read", "duplicate_key", f"row {row}: the key also appears in {first[0]} row {first[1]}"
        )


def shard_row(lf: LaionFile) -> dict:
    """The shards-table row of one file pair."""
    return {
        "shard": lf.shard,
        "path": lf.metadata or lf.npy or "",
        "members": lf.n_vectors,
        "keys": lf.rows,
        "sidecar_rows": lf.n_metadata,
        "truncated": any(p.startswith("truncated") for p in lf.problems),
        "events": list(lf.problems),
    }


class ReadLaion(beam.PTransform):
    """Planned row ranges -> {"info_batches", "moved", "failures", "vectors", "shards"} (see the
    module doc)."""

    def __init__(self, files: list[LaionFile], ranges: list[RowRange], settings: LaionSettings, buckets: int = 1):
        super().__init__()
        self.files, self.ranges, self.settings, self.buckets = files, ranges, settings, buckets

    def expand(self, p):
        from transforms.outputs import multi_output

        ranges = p | "RowRanges" >> beam.Create(self.ranges) | "SpreadRanges" >> beam.Reshuffle()
        out = multi_output(ranges, "ReadRanges", ReadRangeFn(self.settings), ["failures", "vectors", "keys"], "infos")
        repeated = out["keys"] | "RepeatedKeys" >> RepeatedKeys(repeated_keys, lambda w: w[0], self.buckets)
        return {
            "info_batches": out["infos"],
            "moved": repeated["moved"],
            "failures": (out["failures"], repeated["failures"]) | "MergeFailures" >> beam.Flatten(),
            "vectors": out["vectors"],
            "shards": p | "ShardRows" >> beam.Create([shard_row(lf) for lf in self.files]),
        }


def check(cfg) -> None:
    """Settings that need pixels or a per-shard cache cannot apply to precomputed embeddings."""
    from pipeline.config import ConfigError

    if cfg.dedup.clip.enabled:
        raise ConfigError(
            "dedup.clip.enabled: the laion_embeddings layout has no pixels to embed; its precomputed "
            "embeddings are searched at dedup.cluster.threshold instead"
        )
    if cfg.output.filtered_shards:
        raise ConfigError("output.filtered_shards: the laion_embeddings layout has no shards to filter")
    if cfg.dedup.incremental_from:
        raise ConfigError("dedup.incremental_from: not supported for the laion_embeddings layout")


def describe(root: str, files: list[LaionFile]) -> dict:
    return {
        "format": "laion_embeddings",
        "path": root,
        "files": [lf.npy or "" for lf in files],
        "metadata": [lf.metadata or "" for lf in files],
        "rows": sum(lf.rows for lf in files),
        "n_shards": len(files),
        "shards": [],  # no tar shards: the report shows no thumbnails
    }


def read(p: beam.Pipeline, cfg, inputs: list[str], out_dir: str) -> dict:
    """inputs: [the layout's root folder]."""
    from pipeline.config import ConfigError
    from transforms.laion_files import list_files, plan_ranges

    root = inputs[0]
    files = list_files(root)
    if not files:
        raise ConfigError(f"input.path: no img_emb/*.npy or metadata/*.parquet under {root!r}")
    settings = LaionSettings(require_caption=cfg.read.require_caption, max_caption_bytes=cfg.read.max_caption_bytes)
    buckets = n_buckets(len(files), sum(lf.rows for lf in files))
    out = p | "ReadLaion" >> ReadLaion(files, plan_ranges(files), settings, buckets)
    return {
        "info_batches": out["info_batches"],
        "moved": out["moved"],
        "buckets": buckets,
        "failures": out["failures"],
        "shards": out["shards"],
        "vectors": {EMBEDDER: out["vectors"]},
        "pixels": False,
        "input": describe(root, files),
    }
