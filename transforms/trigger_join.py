"""MineTriggers' shard join: record batches made before the clusters are known get their
clusters, from a lean form that crosses the join as a few buffers.

``CaptionRecordsFn`` (``transforms.trigger_records``) makes each shard's records as soon as the
reader has them; everything read before the clusters reads those batches. What needs a cluster
(cluster captions, word triggers, duplicate captions) is joined with the shard's assignments
here. A batch crosses the join as a ``JoinPart``: keys and normalized captions as Arrow arrays,
the terms as their CSR arrays, so the join's shuffle (and the runner's copy of a flattened
input) moves buffers, not a Python object per row; after the join only the rows that can need
their cluster become records again: rows of clustered keys and rows with metadata objects (all
rows when ``min_pair_count`` is 1: clusters of one then count too).
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from pipeline import progress
from transforms.trigger_records import RecordBatch, cluster_columns, cluster_lookup


class JoinPart:
    """A ``RecordBatch`` of one shard, less its raw captions, as buffers (see the module doc)."""

    __slots__ = ("shard", "keys", "norms", "vocab", "term_ids", "term_off", "objects")

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for s, v in zip(self.__slots__, state, strict=True):
            setattr(self, s, v)

    @classmethod
    def of(cls, batch: RecordBatch) -> JoinPart:
        import pyarrow as pa

        from transforms.caption_texts import as_texts

        out = object.__new__(cls)
        out.shard = batch.shard[0] if len(batch) and batch.shard.count(batch.shard[0]) == len(batch) else batch.shard
        out.keys = pa.array(batch.key, pa.string())
        out.norms = as_texts(batch.norm)  # a list where Arrow does not take the text
        out.vocab, out.term_ids, out.term_off, out.objects = batch.vocab, batch.term_ids, batch.term_off, batch.objects
        return out

    def __len__(self) -> int:
        return len(self.keys)

    def records(self, rows: np.ndarray | None) -> RecordBatch:
        """The rows ``rows`` (ascending; None: all) as a RecordBatch of clusters of one whose
        caption is the normalized caption (nothing after the join reads the raw text)."""
        import pyarrow as pa

        n = len(self.keys)
        picked = np.arange(n) if rows is None else rows
        take = pa.array(picked)
        keys = self.keys.take(take).to_pylist() if rows is not None else self.keys.to_pylist()
        if isinstance(self.norms, list):
            norms = [self.norms[i] for i in picked.tolist()]
        else:
            norms = self.norms.take(take).to_pylist() if rows is not None else self.norms.to_pylist()
        shards = [self.shard] * len(picked) if isinstance(self.shard, str) else [self.shard[i] for i in picked.tolist()]
        lens = np.diff(self.term_off)
        if rows is None:
            ids, off = self.term_ids, self.term_off
        else:
            keep = np.zeros(n, dtype=bool)
            keep[picked] = True
            ids = self.term_ids[np.repeat(keep, lens)]
            off = np.zeros(len(picked) + 1, dtype=np.int64)
            np.cumsum(lens[picked], out=off[1:])
        at = {int(i): j for j, i in enumerate(picked.tolist())} if rows is not None else None
        objects = self.objects if at is None else {at[i]: o for i, o in self.objects.items() if i in at}
        ones = np.ones(len(picked), dtype=np.int64)
        return RecordBatch(keys, shards, norms, norms, keys, ones, (self.vocab, ids, off), objects)


def join_part(kv) -> tuple:
    """(shard, (row start, RecordBatch)) -> (shard, (row start, JoinPart))."""
    shard, (start, batch) = kv
    return shard, (start, JoinPart.of(batch))


class ClusterRecordsFn(beam.DoFn):
    """(shard, {"part": [(row start, JoinPart)], "a": ClusterAssignment or lists of assignment
    tuples, "shared": lists of (key, normalized caption)}) -> the shard's RecordBatches with their
    clusters, in row order: every row when ``every_row``, else only the rows of clustered keys and
    the rows with metadata objects; tagged "shared", (caption bucket of ``n``, (MEMBERS, captions,
    keys, shards, cluster ids)) for the (key, caption) pairs of "shared": the records whose
    caption another record has, now with their clusters."""

    def __init__(self, n: int = 1, every_row: bool = True):
        self.n, self.every_row = n, every_row

    def process(self, item) -> Iterator:
        import pyarrow as pa
        import pyarrow.compute as pc

        shard, joined = item
        lookup = cluster_lookup(joined["a"])
        clustered = None if self.every_row else pa.array(list(lookup), pa.string())
        for _, part in sorted(joined["part"], key=lambda p: p[0]):
            progress.advance("triggers", len(part))
            rows = None
            if not self.every_row:
                wanted = pc.is_in(part.keys, value_set=clustered).to_numpy(zero_copy_only=False).copy()
                wanted[list(part.objects)] = True
                rows = np.flatnonzero(wanted)
                if not len(rows):
                    continue
            batch = part.records(rows)
            if lookup:
                batch.cluster_id, sizes = cluster_columns(batch.key, lookup)
                batch.cluster_size = np.asarray(sizes, dtype=np.int64)
            yield batch
        yield from shared_members(shard, joined.get("shared", ()), lookup, self.n)


def shared_members(shard: str, lists, lookup: dict, n: int) -> Iterator:
    """Lists of (key, caption) of a shard -> tagged "shared", (caption bucket, (MEMBERS,
    captions, keys, shards, cluster ids)) per bucket (``trigger_captions.caption_codes``' input)."""
    from transforms.key_batches import bucket_of
    from transforms.trigger_captions import MEMBERS

    out: dict[int, tuple[list, list, list, list]] = {}
    for key, norm in (pair for pairs in lists for pair in pairs):
        found = lookup.get(key)
        columns = out.setdefault(bucket_of(norm, n) if n > 1 else 0, ([], [], [], []))
        for column, value in zip(columns, (norm, key, shard, found[0] if found else key), strict=True):
            column.append(value)
    for b, columns in sorted(out.items()):
        yield beam.pvalue.TaggedOutput("shared", (b, (MEMBERS, *columns)))
