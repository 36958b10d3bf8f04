"""Trigger mining's inputs as batches: one columnar ``RecordBatch`` of caption records per shard
chunk, and the per-batch bucketing that ``transforms.triggers.MineTriggers`` combines.

A record is what the miners need of one ok sample: key, shard, caption, normalized caption,
keyword terms, metadata objects, and its duplicate cluster (its own key and size 1 when it has
no assignment). A batch holds them as columns: lists of strings, the cluster sizes as an array,
the keyword terms as ids into the batch's sorted term vocabulary (CSR: ``term_ids`` with row
offsets ``term_off``) and the metadata objects only for rows that have any. Counting works on
those arrays (``transforms.trigger_counts``); iterating a batch still gives one dict per record
(the reference form, and what the caption stages read). Captions are grouped (template
skeletons here; exact text and MinHash bands in ``trigger_captions``) through hash buckets of
lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np

from pipeline import progress
from transforms.keywords import KeywordExtractor, normalize_caption
from transforms.objects import metadata_objects

CHUNK = 4096  # records per element


INFO_COLUMNS = ("key", "shard", "caption", "meta_json")
NORM_CACHE = 100_000  # distinct captions whose normalized text is kept
_NO_OBJECTS: list[str] = []


class RecordBatch:
    """Records as columns (see the module doc). ``len``, indexing and iteration (dicts) as a
    list of records; the columns (``key``, ``shard``, ``caption``, ``norm``, ``cluster_id``:
    lists) are cheaper to read than the dicts."""

    __slots__ = ("key", "shard", "caption", "norm", "cluster_id", "cluster_size", "vocab", "term_ids", "term_off")
    __slots__ += ("objects",)

    def __init__(self, key, shard, caption, norm, cluster_id, cluster_size, terms, objects=None):
        """Columns as lists; ``terms``: each row's sorted unique terms (tuples), or already as
        ``term_columns`` gives them (a (vocabulary, ids, offsets) triple of arrays); ``objects``:
        {row: sorted object names} for the rows with any."""
        self.key, self.shard, self.caption, self.norm = key, shard, caption, norm
        self.cluster_id = cluster_id
        self.cluster_size = np.asarray(cluster_size, dtype=np.int64)
        is_csr = isinstance(terms, tuple) and len(terms) == 3 and isinstance(terms[1], np.ndarray)
        self.vocab, self.term_ids, self.term_off = terms if is_csr else term_columns(terms)
        self.objects = objects or {}

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for s, v in zip(self.__slots__, state, strict=True):
            setattr(self, s, v)

    def __len__(self) -> int:
        return len(self.key)

    def terms_of(self, i: int) -> tuple[str, ...]:
        vocab = self.vocab
        return tuple(vocab[t] for t in self.term_ids[self.term_off[i] : self.term_off[i + 1]].tolist())

    def term_rows(self) -> np.ndarray:
        """The row of each entry of ``term_ids``."""
        return np.repeat(np.arange(len(self.key)), np.diff(self.term_off))

    def __getitem__(self, i: int) -> dict:
        n = len(self.key)
        if not -n <= i < n:
            raise IndexError(i)
        return self.record(i % n)

    def record(self, i: int) -> dict:
        return {
            "key": self.key[i],
            "shard": self.shard[i],
            "caption": self.caption[i],
            "norm": self.norm[i],
            "terms": self.terms_of(i),
            "objects": self.objects.get(i, _NO_OBJECTS),
            "cluster_id": self.cluster_id[i],
            "cluster_size": int(self.cluster_size[i]),
        }

    def row_terms(self) -> list[tuple[str, ...]]:
        """Each row's terms (tuples of strings)."""
        vocab, ids, off = self.vocab, self.term_ids.tolist(), self.term_off.tolist()
        return [tuple(vocab[t] for t in ids[a:b]) for a, b in zip(off, off[1:], strict=False)]

    def __iter__(self) -> Iterator[dict]:
        objects = self.objects
        columns = (self.key, self.shard, self.caption, self.norm, self.row_terms(), self.cluster_id)
        for i, (k, s, c, n, t, cid, size) in enumerate(zip(*columns, self.cluster_size.tolist(), strict=True)):
            yield {
                "key": k,
                "shard": s,
                "caption": c,
                "norm": n,
                "terms": t,
                "objects": objects.get(i, _NO_OBJECTS),
                "cluster_id": cid,
                "cluster_size": size,
            }

    def take(self, rows: list[int]) -> RecordBatch:
        """The batch's rows ``rows`` (ascending) as a batch of their own (the same vocabulary)."""
        picked = np.asarray(rows, dtype=np.int64)
        keep = np.zeros(len(self.key), dtype=bool)
        keep[picked] = True
        out = object.__new__(RecordBatch)
        for name in ("key", "shard", "caption", "norm", "cluster_id"):
            column = getattr(self, name)
            setattr(out, name, [column[i] for i in rows])
        out.cluster_size = self.cluster_size[picked]
        out.vocab = self.vocab
        out.term_ids = self.term_ids[keep[self.term_rows()]]
        out.term_off = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.diff(self.term_off)[picked], out=out.term_off[1:])
        out.objects = {j: self.objects[i] for j, i in enumerate(rows) if i in self.objects}
        return out

    @classmethod
    def from_records(cls, records: list[dict]) -> RecordBatch:
        """Record dicts (``terms`` sorted unique; absent shard, caption or objects: empty)."""
        objects = {i: list(r["objects"]) for i, r in enumerate(records) if r.get("objects")}
        return cls(
            [r["key"] for r in records],
            [r.get("shard", "") for r in records],
            [r.get("caption", "") for r in records],
            [r["norm"] for r in records],
            [r["cluster_id"] for r in records],
            [r["cluster_size"] for r in records],
            [r["terms"] for r in records],
            objects,
        )


def column(batch, name: str) -> list:
    """One column of a record batch: a ``RecordBatch``'s own list, or the values of a list of
    record dicts."""
    if isinstance(batch, RecordBatch):
        return getattr(batch, name)
    return [r[name] for r in batch]


def term_columns(terms: list[tuple[str, ...]]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Rows' sorted unique terms -> (sorted vocabulary, term ids (int32), row offsets (int64));
    each row's ids ascend, as its terms do."""
    index: dict[str, int] = {}
    ids = [index.setdefault(t, len(index)) for row in terms for t in row]
    first_seen = list(index)
    order = sorted(range(len(first_seen)), key=first_seen.__getitem__)
    remap = np.empty(len(order), dtype=np.int32)
    remap[order] = np.arange(len(order), dtype=np.int32)
    off = np.zeros(len(terms) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in terms], out=off[1:])
    return tuple(first_seen[i] for i in order), remap[np.asarray(ids, dtype=np.int64)], off


def cluster_lookup(assignments: Iterable) -> dict[str, tuple[str, int]]:
    """A shard's assignments (of its clustered keys) -> {key: (cluster id, cluster size)}: the
    only reader of assignments (adapt it when their shape changes). Each item is a
    ``ClusterAssignment`` or a list of assignment tuples (key, cluster id, cluster size, ...:
    ``assignment_rows``' lists)."""
    out: dict[str, tuple[str, int]] = {}
    for a in assignments:
        if isinstance(a, list):
            out.update((t[0], (t[1], t[2])) for t in a)
        else:
            out[a.key] = (a.cluster_id, a.cluster_size)
    return out


def cluster_columns(keys: list[str], lookup: dict) -> tuple[list[str], list[int]]:
    """Rows' keys -> each row's cluster id and size; a key without an assignment is a cluster
    of one (its own key)."""
    got = [lookup.get(k) for k in keys]
    return [g[0] if g else k for g, k in zip(got, keys, strict=True)], [g[1] if g else 1 for g in got]


class _Row:
    """The info columns records need (no SampleInfo per row)."""

    __slots__ = INFO_COLUMNS

    def __init__(self, key, shard, caption, meta_json):
        self.key, self.shard, self.caption, self.meta_json = key, shard, caption, meta_json


def info_rows(table) -> Iterator[_Row]:
    """An info batch -> its rows' key, shard, caption and meta_json, read column by column."""
    yield from map(_Row, *(table.column(c).to_pylist() for c in INFO_COLUMNS))


def first_table(tables: list):
    """A shard's info tables -> one table of their INFO_COLUMNS, less the rows whose key is
    earlier in it (a key repeated in one shard: its first record); None when there are none."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = [t.select(list(INFO_COLUMNS)) for t in tables if t.num_rows]
    if not parts:
        return None
    schema = pa.schema([(c, pa.string()) for c in INFO_COLUMNS])
    table = pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in parts])
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() == table.num_rows:
        return table
    seen: set[str] = set()
    keep = [k not in seen and not seen.add(k) for k in keys.to_pylist()]
    return table.filter(pa.array(keep))


class CaptionRecordsFn(beam.DoFn):
    """(shard, info tables) -> (shard, (row start, RecordBatch)) per <= CHUNK rows of the shard
    (``first_table``): every column but the clusters, built column by column (``_batch``); each
    record is a cluster of one (its key, size 1) until ``with_clusters`` gives it its cluster.
    Nothing here waits for the duplicate search: the caption stages read these batches."""

    def __init__(self, bigrams: bool, use_metadata: bool):
        self.bigrams = bigrams
        self.use_metadata = use_metadata

    def setup(self):
        self.extractor = KeywordExtractor(self.bigrams)
        self.norms: dict[str, str] = {}

    def _norm(self, caption: str) -> str:
        norm = self.norms.get(caption)
        if norm is None:
            norm = normalize_caption(caption)
            if len(self.norms) < NORM_CACHE:
                self.norms[caption] = norm
        return norm

    def process(self, item) -> Iterator[tuple[str, tuple[int, RecordBatch]]]:
        shard, tables = item
        table = first_table(list(tables))
        if table is None:
            return
        for start in range(0, table.num_rows, CHUNK):
            yield shard, (start, self._batch(table.slice(start, CHUNK)))

    def _batch(self, table) -> RecordBatch:
        """A chunk of the shard's rows, every record a cluster of one."""
        keys = table.column("key").to_pylist()
        captions = table.column("caption").combine_chunks()
        texts = captions.to_pylist()
        objects = {}
        if self.use_metadata:
            metas = table.column("meta_json")
            maybe = np.flatnonzero(may_name_objects(metas)).tolist()
            named = metas.take(maybe).to_pylist() if maybe else []
            objects = {i: o for i, m in zip(maybe, named, strict=True) if (o := metadata_objects(m))}
        return RecordBatch(
            keys,
            shard_column(table.column("shard")),
            texts,
            self._norms(captions, texts),
            keys,  # the same list: pickled once
            np.ones(len(keys), dtype=np.int64),
            self.extractor.batch_terms(captions, texts),
            objects,
        )

    def _norms(self, captions, texts: list[str]) -> list[str]:
        """``normalize_caption`` of each caption: ASCII ones in Arrow (the words are the runs of
        [0-9a-z_] of the lower-cased text; a lower-cased caption that is already such words
        joined by single spaces is its own normal form), the others one by one (cached). A
        caption that is its own normalized form stays the same string object (pickled once)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        def mask(values) -> np.ndarray:
            return pc.fill_null(values, False).to_numpy(zero_copy_only=False)

        ascii_ = mask(pc.string_is_ascii(captions))
        lowered = pc.ascii_lower(captions)
        clean = ascii_ & mask(pc.match_substring_regex(lowered, "^[0-9a-z_]+(?: [0-9a-z_]+)*$"))
        out = list(texts)  # a caption that is its own normalized form stays itself
        lower = np.flatnonzero(clean & ~mask(pc.equal(lowered, captions)))
        if len(lower):
            for i, norm in zip(lower.tolist(), lowered.take(pa.array(lower)).to_pylist(), strict=True):
                out[i] = norm
        dirty = np.flatnonzero(ascii_ & ~clean)
        if len(dirty):
            words = pc.replace_substring_regex(lowered.take(pa.array(dirty)), "[^0-9a-z_]+", " ")
            for i, norm in zip(dirty.tolist(), pc.utf8_trim(words, " ").to_pylist(), strict=True):
                out[i] = texts[i] if norm == texts[i] else norm
        for i in np.flatnonzero(~ascii_).tolist():
            norm = self._norm(texts[i])
            out[i] = texts[i] if norm == texts[i] else norm
        return out


def with_clusters(batch: RecordBatch, lookup: dict) -> RecordBatch:
    """A batch of ``CaptionRecordsFn`` with each record's cluster (``cluster_lookup``'s dict;
    a key without an assignment stays a cluster of one), in place."""
    if lookup:
        batch.cluster_id, sizes = cluster_columns(batch.key, lookup)
        batch.cluster_size = np.asarray(sizes, dtype=np.int64)
    progress.advance("triggers", len(batch))
    return batch


class ShardRecordsFn(CaptionRecordsFn):
    """(shard, {"info": info tables, "a": assignments}) -> RecordBatch (<= CHUNK rows): the
    caption columns (``CaptionRecordsFn``) and the clusters (``with_clusters``) in one step."""

    def process(self, item) -> Iterator[RecordBatch]:
        shard, joined = item
        lookup = cluster_lookup(joined["a"])
        for _, (_, batch) in super().process((shard, joined["info"])):
            yield with_clusters(batch, lookup)


def may_name_objects(metas) -> np.ndarray:
    """Which rows' metadata json ``metadata_objects`` parses (the others have no objects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = metas.combine_chunks() if isinstance(metas, pa.ChunkedArray) else metas
    _, off_buf, data_buf = text.buffers() if text.type == pa.string() else (None, None, None)
    if data_buf is not None and len(text):  # neither anywhere in the bytes: no row has one
        offsets = np.frombuffer(off_buf, np.int32)[text.offset : text.offset + len(text) + 1]
        data = data_buf[offsets[0] : offsets[-1]].to_pybytes() if offsets[-1] > offsets[0] else b""
        if b"objects" not in data and b"\\u" not in data:
            return np.zeros(len(text), dtype=bool)
    hit = pc.or_(pc.match_substring(metas, "objects"), pc.match_substring(metas, "\\u"))
    return pc.fill_null(hit, False).to_numpy(zero_copy_only=False)


def shard_column(shards) -> list[str]:
    """A shard column as a list whose equal strings are one object (pickled once)."""
    import pyarrow.compute as pc

    distinct = pc.unique(shards)
    if len(distinct) == 1:
        return [distinct[0].as_py()] * len(shards)
    return _shared(shards.to_pylist())


def _shared(values: list[str]) -> list[str]:
    """Equal strings as one object each (pickled once)."""
    seen: dict[str, str] = {}
    return [seen.setdefault(v, v) for v in values]
