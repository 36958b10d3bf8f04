"""The reader of LAION's precomputed-embedding layout: the same elements as ``ProcessShards``.

``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet`` (``transforms.laion_files``). Work
items are row ranges (metadata row groups); each yields, per batch of a few thousand rows:

- one table of ``SampleInfo`` columns (``schemas.arrow.INFO_BATCH``), a row per good row (key,
  shard = the metadata file, url, caption, sizes and original sizes from the metadata; every
  other column in ``meta_json``; no pixels, so no pixel digest),
- ``Failure`` per bad row (a vector without a metadata row or the reverse, a missing file; a
  download status other than success; no usable vector: NaN, infinite or zero; a caption over
  ``max_caption_bytes`` in UTF-8 or none; a key repeated inside the range), so every row's key
  still reaches the manifest,
- one vector batch of the good rows, for ``VectorEdges``: ``(keys, float16 unit vectors)``, or,
  when the file's rows are unit float16 already (LAION's are), a ``spill.InputRows`` reference to
  them (keys and row numbers): the cell search reads them again from the input file instead of
  writing a copy to its spill folder.

The rules run on columns (``transforms.laion_rows``): the metadata's Arrow record batch and the
batch's vector norms give a reason code per row, the good rows' table is built with
pyarrow.compute, and Python objects are made only for failed rows. Keys repeated across ranges
and files are reported as ``duplicate_key`` failures (the first file keeps the key), as the
webdataset reader does, from per-range key arrays in hash buckets (``transforms.key_arrays``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from pipeline import progress
from schemas.elements import Failure
from transforms import laion_rows as lr
from transforms.key_arrays import RepeatedKeyArrays, SeenKeys, key_hashes
from transforms.key_batches import n_buckets
from transforms.laion_files import LaionFile, RowRange, VectorSource, open_file
from transforms.spill import InputRows

VECTOR_BATCH = 4096  # rows per vector element (16 MB at 1024 dims)
EMBEDDER = "clip"  # LAION's img_emb are CLIP image embeddings
FIELDS = lr.FIELDS
MIN_NORM = 1e-6
# float16 rows whose float32 norm is within this of 1 come out of x / norm -> float16 unchanged:
# |v e| < half a float16 ulp of v for |e| < 2**-12 (tests/test_laion_columns.py checks it)
UNIT_TOL = 2.4e-4


@dataclasses.dataclass(frozen=True)
class LaionSettings:
    require_caption: bool = True
    max_caption_bytes: int = 16 * 1024
    batch_rows: int = VECTOR_BATCH
    # unit float16 rows travel as a reference to the input file's rows (``spill.InputRows``),
    # read again by the cell search's stages instead of written to its spill folder
    reread_vectors: bool = True


def synthetic_key(shard: str, row: int) -> str:
    return f"{shard}:{row:09d}"


_SQUARES: np.ndarray | None = None


def _float16_squares() -> np.ndarray:
    """float32 square of every float16 bit pattern (inf/NaN where the value is)."""
    global _SQUARES
    if _SQUARES is None:
        v = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            _SQUARES = v * v
    return _SQUARES


def row_norms(vecs: np.ndarray, chunk: int = 256) -> np.ndarray:
    """float32 norms of the rows (a usable row: finite and > MIN_NORM), a chunk at a time so the
    float32 copy stays in cache. float16 rows look their squares up in a 65,536-entry table
    (numpy's float16 -> float32 cast is half the reader's norm time); the sum is the same
    ``add.reduce`` over the same float32 squares as ``np.linalg.norm``, so the norms are equal bit
    for bit (tests/test_laion_columns.py)."""
    out = np.empty(len(vecs), dtype=np.float32)
    if vecs.dtype == np.float16:
        squares, bits = _float16_squares(), vecs.view(np.uint16)
        for i in range(0, len(vecs), chunk):
            np.sqrt(np.add.reduce(squares.take(bits[i : i + chunk]), axis=1), out=out[i : i + chunk])
        return out
    for i in range(0, len(vecs), chunk):
        out[i : i + chunk] = np.linalg.norm(vecs[i : i + chunk].astype(np.float32), axis=1)
    return out


def unit_already(vecs: np.ndarray, norms: np.ndarray, rows: np.ndarray | None) -> bool:
    """True when the float16 ``rows`` (None: all) are their own unit vectors (LAION's are)."""
    n = norms if rows is None else norms[rows]
    return vecs.dtype == np.float16 and bool(len(n)) and float(np.abs(n - 1).max()) <= UNIT_TOL


def unit_float16(vecs: np.ndarray, norms: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The ``rows`` (None: all) as float16 unit vectors, float32 x / norm rounded to float16;
    float16 rows that are unit already (LAION's are) are that result as they are, no casts."""
    sel = slice(None) if rows is None else rows
    if unit_already(vecs, norms, rows):
        return vecs[sel]
    x = vecs[sel].astype(np.float32)
    x /= norms[sel][:, None]
    return x.astype(np.float16)


class ReadRangeFn(beam.DoFn):
    """RowRange -> SampleInfo tables (main, one per batch); tagged "failures", "vectors" (keys,
    float16 unit vectors) and "keys" ((bucket, (shard, keys, rows)) per bucket of the range)."""

    def __init__(self, settings: LaionSettings, buckets: int = 1):
        self.settings, self.buckets = settings, buckets

    def setup(self):
        self.vectors = VectorSource()
        self.rows_read = beam.metrics.Metrics.counter("read", "laion_rows")
        self._ahead = None

    def teardown(self):
        if getattr(self, "_ahead", None) is not None:
            self._ahead.shutdown(wait=True)
            self._ahead = None
        self.vectors.close()

    def process(self, item: RowRange) -> Iterator:
        seen = SeenKeys()  # keys of this range (row groups): a repeat is dropped here
        for batch, start, n, vecs, norms in self._read_ahead(item):
            yield from self._batch(item.file, batch, start, n, vecs, norms, seen)
            self.rows_read.inc(n)
            progress.advance("samples decoded", n)
        for kv in seen.split(item.file.shard, self.buckets):
            yield beam.pvalue.TaggedOutput("keys", kv)
        if item.stop >= item.file.rows:  # the file's last range
            progress.advance("shards")

    def _metadata_batches(self, item: RowRange) -> Iterator[tuple]:
        """-> (metadata record batch, first row, rows) per batch; None past the metadata."""
        size = self.settings.batch_rows
        if item.row_groups:
            import pyarrow.parquet as pq

            pos = item.start
            with open_file(item.file.metadata) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=size, row_groups=list(item.row_groups)):
                    yield batch, pos, batch.num_rows
                    pos += batch.num_rows
            return
        for s in range(item.start, item.stop, size):
            yield None, s, min(item.stop, s + size) - s

    def _read_ahead(self, item: RowRange) -> Iterator[tuple]:
        """-> (metadata batch, first row, rows, vectors, their norms) per batch, in order. The next
        batch is read (Parquet decode, the .npy rows) and its norms computed on one helper thread
        while this one checks the current batch: mostly work that releases the GIL, so the
        range's first stage overlaps its reads with its checks. One batch ahead at most."""
        if getattr(self, "_ahead", None) is None:
            from concurrent.futures import ThreadPoolExecutor

            self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memsieve-read-ahead")
        batches = self._metadata_batches(item)
        lf = item.file

        def fetch():  # runs on the helper thread only: the generator and the open .npy stay there
            got = next(batches, None)
            if got is None:
                return None
            batch, start, n = got
            n_vec = max(0, min(start + n, lf.n_vectors) - start) if batch is not None else 0
            vecs = self.vectors.rows(lf.npy, start, start + n_vec) if n_vec else np.empty((0, lf.dim), np.float32)
            return batch, start, n, vecs, row_norms(vecs)

        pending = self._ahead.submit(fetch)
        try:
            while (got := pending.result()) is not None:
                pending = self._ahead.submit(fetch)
                yield got
        finally:  # the helper is idle again before the generator closes (or the next range)
            if not pending.cancel():
                pending.exception()  # waits for a read in flight; its error, if any, is not this one's
            batches.close()

    def _keys(self, lf: LaionFile, batch, start: int, n: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        keys = lr.stripped(lr.text_column(batch, "key", n))
        empty = pc.equal(pc.binary_length(keys), 0)
        if pc.any(empty).as_py():  # the synthetic key: the file and the row
            rows = np.flatnonzero(empty.to_numpy(zero_copy_only=False))
            made = pa.array([synthetic_key(lf.shard, start + int(i)) for i in rows], pa.string())
            keys = pc.replace_with_mask(keys, empty, made)
        return keys

    def _batch(self, lf: LaionFile, batch, start: int, n: int, vecs, norms, seen: SeenKeys) -> Iterator:
        """One metadata batch and its vectors (none past the metadata: every row fails there)."""
        import pyarrow as pa

        from schemas.arrow import INFO_BATCH

        n_vec = len(vecs)
        good_vec = np.isfinite(norms) & (norms > MIN_NORM)
        s = self.settings
        keys = self._keys(lf, batch, start, n)
        caption = lr.stripped(lr.text_column(batch, "caption", n))
        status = lr.text_column(batch, "status", n)
        reasons = lr.row_reasons(batch, n, good_vec, caption, status, s.max_caption_bytes, s.require_caption)
        hashes = key_hashes(keys)
        first = seen.first(keys, hashes)
        kept = np.flatnonzero(first)
        seen.add(keys.take(pa.array(kept)), hashes[kept], start + kept)
        yield from self._failures(lf, batch, start, n, keys, caption, status, reasons, first)
        good = np.flatnonzero(first & (reasons == lr.OK))
        if not len(good):
            return
        whole = len(good) == n
        rows = batch if whole else batch.take(pa.array(good))
        others = sorted(c for c in batch.schema.names if c not in FIELDS)
        cols = lr.info_columns(
            rows,
            lf.shard,
            keys if whole else keys.take(pa.array(good)),
            caption if whole else caption.take(pa.array(good)),
            others,
        )
        table = pa.Table.from_arrays([cols[f.name] for f in INFO_BATCH], schema=INFO_BATCH)
        yield table  # one info batch per reader batch, not one element per row
        rows = None if whole else good
        if s.reread_vectors and unit_already(vecs, norms, rows):  # as stored: the cell search reads them again
            keys = np.asarray(table.column("key").to_pylist(), dtype=str)
            payload = (vecs if rows is None else vecs[rows]).reshape(len(keys), 1, -1)  # for the fused sample
            yield beam.pvalue.TaggedOutput("vectors", InputRows(lf.npy, start, start + n_vec, keys, rows, payload))
            return
        # float16, as the cell search stores them: half the bytes in flight
        unit = unit_float16(vecs, norms, rows)
        yield beam.pvalue.TaggedOutput("vectors", (table.column("key").to_pylist(), unit))

    def _failures(self, lf, batch, start, n, keys, caption, status, reasons, first) -> Iterator:
        """Failure records of the bad rows (few): repeats in the range, then each row's reason."""
        bad = np.flatnonzero(~first | (reasons != lr.OK))
        if not len(bad):
            return
        import pyarrow as pa

        take = pa.array(bad)
        cols = {"key": keys, "caption": caption, "status": status}
        for name in ("url", "sha256", "error_message"):
            cols[name] = lr.text_column(batch, name, n)
        val = {name: col.take(take).to_pylist() for name, col in cols.items()}
        why = "; ".join(lf.problems) or lf.shard
        for j, i in enumerate(bad.tolist()):
            row, key = start + i, val["key"][j]
            if not first[i]:  # repeated inside this range: the first row keeps it
                msg = f"row {row}: the key repeats in {lf.shard}"
                yield beam.pvalue.TaggedOutput("failures", Failure(key, lf.shard, "read", "duplicate_key", msg))
                continue
            stage, error_type, message = _reason(lf, int(reasons[i]), row, why, val, j, self.settings)
            failure = Failure(
                key, lf.shard, stage, error_type, message[:500], val["url"][j], val["caption"][j], val["sha256"][j]
            )
            yield beam.pvalue.TaggedOutput("failures", failure)


def _reason(lf: LaionFile, code: int, row: int, why: str, val: dict, j: int, s: LaionSettings) -> tuple:
    """-> (stage, error_type, message) of a failed row's reason code."""
    if code == lr.NO_META:
        kind = "row_count_mismatch" if lf.metadata_ok else "missing_metadata"
        return "read", kind, f"row {row}: no metadata ({why})"
    if code == lr.NO_VECTOR:
        kind = "row_count_mismatch" if lf.npy_ok else "missing_vector"
        return "read", kind, f"row {row}: no embedding ({why})"
    if code == lr.STATUS:
        return "download", val["status"][j], val["error_message"][j] or val["status"][j]
    if code == lr.BAD_VECTOR:
        return "read", "bad_vector", f"row {row}: the embedding is NaN, infinite or zero"
    if code == lr.TOO_LONG:
        return "read", "caption_too_long", f"caption is over {s.max_caption_bytes} bytes"
    return "read", "missing_caption", "no caption in the metadata row"


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
        fn = ReadRangeFn(self.settings, self.buckets)
        out = multi_output(ranges, "ReadRanges", fn, ["failures", "vectors", "keys"], "infos")
        repeated = out["keys"] | "RepeatedKeys" >> RepeatedKeyArrays(repeated_keys)
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
