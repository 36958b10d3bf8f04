"""Deterministic, atomic Parquet writers.

Rows are grouped by a partition (the shard for per-sample tables), sorted by an explicit key
and written to ``TABLE/part-<partition>.parquet`` through a temporary name and a rename (one PUT
on an object store; ``transforms.fsio``), so a crash never leaves a partial file that looks
complete, and two runs write identical bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam

from pipeline import progress
from transforms import fsio

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_part_name(partition: str) -> str:
    """A partition value -> a file-name-safe token (never a path)."""
    cleaned = _SAFE.sub("_", partition).strip("._") or "part"
    return cleaned[:120]


def bucket(value: str, n: int) -> str:
    """A stable hash bucket (of ``n``, zero-padded) for tables without a shard column: a cluster
    id's rows land in one part, and the parts are as many as the input shards."""
    import zlib

    n = max(1, int(n))
    return f"{zlib.crc32(value.encode('utf-8', 'surrogatepass')) % n:0{len(str(n - 1))}d}"


_CRC_TABLE = None


def _crc_table():
    import numpy as np

    global _CRC_TABLE
    if _CRC_TABLE is None:
        c = np.arange(256, dtype=np.uint32)
        for _ in range(8):
            c = np.where(c & 1, np.uint32(0xEDB88320) ^ (c >> np.uint32(1)), c >> np.uint32(1)).astype(np.uint32)
        _CRC_TABLE = c
    return _CRC_TABLE


def crc32s(values):
    """``zlib.crc32`` of each string's UTF-8 bytes (a list, numpy or Arrow string array),
    vectorised over the strings: one table step per byte position -> a uint32 array."""
    import numpy as np

    from transforms.key_batches import _utf8

    offsets, data = _utf8(values)
    n = len(offsets) - 1
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    if n:
        lengths = np.diff(offsets)
        order = np.argsort(-lengths, kind="stable")  # longest first: the rows still going are a prefix
        starts, sorted_len, c = offsets[:-1][order], lengths[order], crc[order]
        table = _crc_table()
        for j in range(int(sorted_len[0])):
            live = int(np.searchsorted(-sorted_len, -j, side="left"))  # rows with length > j
            byte = data[starts[:live] + j].astype(np.uint32)
            c[:live] = table[(c[:live] ^ byte) & np.uint32(0xFF)] ^ (c[:live] >> np.uint32(8))
        crc[order] = c
    return crc ^ np.uint32(0xFFFFFFFF)


def buckets(values, n: int):
    """``bucket`` of many strings at once -> an int array (the same buckets, without the
    per-call formatting)."""
    import numpy as np

    n = max(1, int(n))
    return (crc32s(values) % np.uint32(n)).astype(np.int64)


def bucket_labels(values, n: int):
    """``bucket`` of many strings at once -> an object array of the labels."""
    import numpy as np

    n = max(1, int(n))
    names = np.array([f"{i:0{len(str(n - 1))}d}" for i in range(n)], dtype=object)
    return names[buckets(values, n)]


def split_table(table, column: str, n: int) -> Iterator[tuple[int, object]]:
    """A pyarrow Table -> (hash bucket of ``column``'s value, that bucket's rows) per bucket:
    keyed work on tables (the bucket is the key of a shuffle)."""
    import numpy as np

    if not table.num_rows:
        return
    if n <= 1:
        yield 0, table
        return
    b = buckets(table.column(column), n)
    order = np.argsort(b, kind="stable")
    cuts = np.flatnonzero(np.diff(b[order])) + 1
    for part in np.split(order, cuts):
        yield int(b[part[0]]), table.take(part)


def write_rows(path: str, rows: list[dict], schema) -> str:
    """Write rows (dicts) with the schema to ``path`` atomically; returns the path."""
    import pyarrow as pa

    return write_arrow(path, pa.Table.from_pylist(rows, schema=schema))


def write_arrow(path: str, table) -> str:
    """Write a pyarrow Table to ``path`` atomically (as ``write_rows``); returns the path.
    One chunk per column first: Parquet's page and dictionary-fallback boundaries follow the
    chunks, so the bytes depend only on the rows (``memsieve decide`` rewrites them exactly).
    Dictionary encoding only for the columns that repeat values (``dictionary_columns``)."""
    import pyarrow.parquet as pq

    table = table.combine_chunks()
    with fsio.atomic_writer(path) as f:
        pq.write_table(table, f, compression="zstd", write_statistics=True, use_dictionary=dictionary_columns(table))
    return path


class BackgroundWrites:
    """``write_arrow`` calls run on helper threads while the caller goes on: Parquet encoding and
    compression run in pyarrow's C++ without the GIL, so a stage's next shard is built while its
    last one is written. At most ``limit`` tables wait at once (memory stays bounded); ``wait``
    (at the end of a bundle, before its outputs count) returns once every file is in place and
    raises the first write's error. Counters stay with the caller (Beam's metrics are per thread)."""

    def __init__(self, limit: int = 2):
        self.limit, self.pending = limit, []

    def submit(self, path: str, table) -> str:
        self.pending.append(_writer_pool().submit(write_arrow, path, table))
        while len(self.pending) > self.limit:
            self.pending.pop(0).result()
        return path

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for f in pending:  # every write finishes (no half-written temporary left behind) ...
            f.exception()
        for f in pending:  # ... then the first error, if any, is raised
            f.result()


WRITER_THREADS = 2


def _writer_pool():
    from transforms.threads import pool

    return pool("parquet-writer", WRITER_THREADS)


DICTIONARY_SAMPLE = 4096  # leading rows that decide a column's encoding


def dictionary_columns(table) -> list[str] | bool:
    """The Parquet column paths worth a dictionary: those whose first ``DICTIONARY_SAMPLE`` values
    are at most half distinct. A column of mostly distinct values (keys, urls, captions,
    similarities) is written plain: a dictionary there is built, outgrows its page and is
    dropped (Parquet's fallback), work that makes the file larger. A function of the rows only."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = []
    for field, column in zip(table.schema, table.columns, strict=True):
        values, path = column.slice(0, DICTIONARY_SAMPLE), field.name
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            if pa.types.is_nested(field.type.value_type):
                return True  # nested deeper: every column as Parquet's default
            values, path = pc.list_flatten(values), f"{field.name}.list.element"
        elif pa.types.is_nested(field.type):
            return True
        if len(values) == 0 or pc.count_distinct(values, mode="all").as_py() * 2 <= len(values):
            out.append(path)
    return out


def atomic_write_text(path: str, text: str) -> None:
    fsio.write_text(path, text)


class _WritePart(beam.DoFn):
    def __init__(self, table_dir: str, schema, sort_key: Callable[[dict], tuple]):
        self.table_dir = table_dir
        self.schema = schema
        self.sort_key = sort_key

    def process(self, item: tuple[str, Iterable[dict]]):
        partition, rows = item
        ordered = sorted(rows, key=self.sort_key)
        path = fsio.join(self.table_dir, f"part-{safe_part_name(partition)}.parquet")
        write_rows(path, ordered, self.schema)
        beam.metrics.Metrics.counter("write", fsio.basename(self.table_dir)).inc(len(ordered))
        progress.advance("write", len(ordered))
        yield path


class WriteTable(beam.PTransform):
    """Rows -> ``table_dir/part-<partition>.parquet`` files; yields the written paths."""

    def __init__(self, table_dir: str, schema, partition: Callable[[dict], str], sort_key: Callable[[dict], tuple]):
        super().__init__()
        self.table_dir = table_dir
        self.schema = schema
        self.partition = partition
        self.sort_key = sort_key

    def expand(self, rows):
        return (
            rows
            | "ByPartition" >> beam.Map(lambda r, f=self.partition: (f(r), r))
            | "GroupPartition" >> beam.GroupByKey()
            | "WritePart" >> beam.ParDo(_WritePart(self.table_dir, self.schema, self.sort_key))
        )


def _factorized(labels):
    """Partition labels per row (an Arrow string column, or anything numpy takes) -> (an int code
    per row, the distinct labels in first-seen order), as ``pandas.factorize``; an Arrow column
    without nulls is encoded by Arrow (no Python string per row)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(labels, pa.ChunkedArray | pa.Array) and not labels.null_count:
        encoded = pc.dictionary_encode(labels)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        return codes, pd.Index(encoded.dictionary.to_pylist(), dtype=object)
    return pd.factorize(np.asarray(labels, dtype=object))


def _partition_lists(rows, partition: Callable[[dict], str], table_partition=None) -> Iterator[tuple[str, object]]:
    """A list of row dicts, or a pyarrow Table (``table_partition``: the table -> a partition
    label per row), -> (partition, its rows as a list or a Table)."""
    if table_partition is not None and not isinstance(rows, list):
        import numpy as np

        codes, labels = _factorized(table_partition(rows))
        if len(labels) == 1:
            yield str(labels[0]), rows
            return
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(labels) + 1))
        for i, label in enumerate(labels.tolist()):
            yield str(label), rows.take(order[bounds[i] : bounds[i + 1]])
        return
    parts: dict[str, list[dict]] = {}
    for r in rows:
        parts.setdefault(partition(r), []).append(r)
    yield from parts.items()


def _concat(item: tuple[str, Iterable], schema=None) -> tuple[str, object]:
    """A partition's lists of rows -> one list; with Tables among them -> one Table."""
    partition, pieces = item
    pieces = list(pieces)
    if all(isinstance(p, list) for p in pieces):
        return partition, [r for rows in pieces for r in rows]
    import pyarrow as pa

    tables = [p if not isinstance(p, list) else pa.Table.from_pylist(p, schema=schema) for p in pieces]
    return partition, pa.concat_tables(tables)


class _WriteBatchPart(_WritePart):
    """A partition's rows (a list of dicts, or a pyarrow Table sorted by ``sort_columns``)."""

    def __init__(self, table_dir: str, schema, sort_key, sort_columns):
        super().__init__(table_dir, schema, sort_key)
        self.sort_columns = sort_columns
        self._writes = BackgroundWrites()

    def start_bundle(self):
        self._writes = BackgroundWrites()

    def finish_bundle(self):
        self._writes.wait()  # the bundle's parts are in place before its paths count

    def process(self, item):
        partition, rows = item
        if isinstance(rows, list):
            yield from super().process(item)
            return
        table = rows.sort_by([(c, "ascending") for c in self.sort_columns]).select(self.schema.names)
        table = table.cast(self.schema)
        path = self._writes.submit(fsio.join(self.table_dir, f"part-{safe_part_name(partition)}.parquet"), table)
        beam.metrics.Metrics.counter("write", fsio.basename(self.table_dir)).inc(table.num_rows)
        progress.advance("write", table.num_rows)
        yield path


class WriteBatches(beam.PTransform):
    """Lists of rows -> ``table_dir/part-<partition>.parquet`` files, as ``WriteTable`` writes
    them, with one shuffled list per (batch, partition) instead of one element per row.

    pyarrow Tables of the schema may come instead of lists when ``table_partition`` (a Table ->
    one partition label per row) and ``sort_columns`` (the columns ``sort_key`` reads, in its
    order) are given: they are split, shuffled and written as Tables, no dict per row."""

    def __init__(
        self,
        table_dir: str,
        schema,
        partition: Callable[[dict], str],
        sort_key: Callable[[dict], tuple],
        table_partition: Callable | None = None,
        sort_columns: tuple[str, ...] = (),
    ):
        super().__init__()
        self.table_dir, self.schema, self.partition, self.sort_key = table_dir, schema, partition, sort_key
        self.table_partition, self.sort_columns = table_partition, sort_columns

    def expand(self, batches):
        return (
            batches
            | "ByPartition"
            >> beam.FlatMap(_partition_lists, partition=self.partition, table_partition=self.table_partition)
            | "GroupPartition" >> beam.GroupByKey()
            | "Concat" >> beam.Map(_concat, schema=self.schema)
            | "WritePart" >> beam.ParDo(_WriteBatchPart(self.table_dir, self.schema, self.sort_key, self.sort_columns))
        )


def read_table(table_dir: str):
    """Read a table folder (or file) written by WriteTable as one pyarrow Table (sorted parts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fsio.isfile(table_dir):
        with fsio.open_input(table_dir) as f:
            return pq.read_table(f)
    parts = [p for p in fsio.listdir(table_dir) if p.endswith(".parquet")]
    if not parts:
        return None
    tables = []
    for p in parts:
        with fsio.open_input(fsio.join(table_dir, p)) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="default")
