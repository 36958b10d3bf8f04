"""Keys repeated across work items, found on arrays instead of per-key Python tuples.

The columnar sibling of ``key_batches.RepeatedKeys``: a reader ships, per work item and hash
bucket, one element ``(bucket, (shard, keys, rows))`` (an Arrow string array and an int64
numpy array of the rows the keys sit on in ``shard``); one group per bucket concatenates them,
counts each key with a dictionary encoding, and only the keys seen more than once (few) become
Python ``(key, [(shard, row), ...])`` groups for the same failure and ``moved`` rules.

The bucket is the key's 64-bit id (``key_batches.key_ids``: a hash of its UTF-8 bytes computed
with numpy over the Arrow buffers, no Python string per key), stable across processes and machines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.key_batches import _repeats, key_ids


def key_hashes(keys: pa.Array) -> np.ndarray:
    """An Arrow string array (no nulls) -> a uint64 hash per key: ``key_batches.key_ids`` (FNV-1a
    over the UTF-8 bytes, vectorised, then a finaliser), the one key hash of the project."""
    return key_ids(keys).view(np.uint64)


def buckets_of(keys: pa.Array, n: int) -> np.ndarray:
    """The hash bucket (0..n-1) of each key."""
    return (key_hashes(keys) % np.uint64(max(1, n))).astype(np.int64)


def split_key_arrays(
    shard: str, keys: pa.Array, rows: np.ndarray, n: int, hashes: np.ndarray | None = None
) -> Iterator[tuple[int, tuple]]:
    """-> (bucket, (shard, keys, rows)) per non-empty bucket, in bucket order (``hashes``: the
    keys' ``key_hashes`` when known)."""
    if not len(keys):
        return
    h = key_hashes(keys) if hashes is None else hashes
    b = (h % np.uint64(max(1, n))).astype(np.int64)
    order = np.argsort(b, kind="stable")
    sorted_b = b[order]
    cuts = np.flatnonzero(np.diff(sorted_b)) + 1
    for part in np.split(order, cuts):
        yield int(b[part[0]]), (shard, keys.take(pa.array(part)), np.asarray(rows)[part])


def bucket_repeats(item, failures_of: Callable) -> Iterator:
    """(bucket, [(shard, keys, rows), ...]) -> ``failures_of((key, [(shard, row), ...]))`` for
    every key seen more than once, and ``moved`` markers, as ``key_batches.RepeatedKeys`` does."""
    bucket, pieces = item
    pieces = [p for p in pieces if len(p[1])]
    if not pieces:
        return
    keys = pa.concat_arrays([p[1].cast(pa.large_string()) for p in pieces])
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    repeated = np.bincount(codes)[codes] > 1
    if not repeated.any():
        return
    where = np.flatnonzero(repeated)
    piece_of = np.repeat(np.arange(len(pieces)), [len(p[1]) for p in pieces])[where]
    rows = np.concatenate([np.asarray(p[2], dtype=np.int64) for p in pieces])[where]
    names = keys.take(pa.array(where)).to_pylist()
    pairs = [(k, (pieces[i][0], int(r))) for k, i, r in zip(names, piece_of.tolist(), rows.tolist(), strict=True)]
    yield from _repeats((bucket, [pairs]), failures_of, lambda w: w[0])


class RepeatedKeyArrays(beam.PTransform):
    """(bucket, (shard, keys, rows)) elements -> {"failures": ``fn((key, [(shard, row)...]))`` for
    keys seen more than once, "moved": (shard, key) of the occurrences outside the key's first
    shard}: ``key_batches.RepeatedKeys``' outputs from array elements."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def expand(self, pieces):
        from transforms.outputs import multi_output

        grouped = pieces | "GroupKeyArrays" >> beam.GroupByKey()
        out = multi_output(grouped, "Repeats", bucket_repeats, ["moved"], "failures", failures_of=self.fn)
        return {"failures": out["failures"], "moved": out["moved"]}


class SeenKeys:
    """The keys of one work item so far, batch by batch: which keys of a batch are new (their
    first occurrence in the item); kept keys, rows and hashes for ``split_key_arrays``."""

    def __init__(self):
        self.sorted_hashes = np.empty(0, dtype=np.uint64)
        self.keys: list[pa.Array] = []
        self.rows: list[np.ndarray] = []
        self.hashes: list[np.ndarray] = []

    def first(self, keys: pa.Array, hashes: np.ndarray) -> np.ndarray:
        """-> a mask of the keys not seen before (in this batch or an earlier one)."""
        new = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return new
        codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
        new[np.unique(codes, return_index=True)[1]] = True
        if len(self.sorted_hashes):
            pos = np.minimum(np.searchsorted(self.sorted_hashes, hashes), len(self.sorted_hashes) - 1)
            maybe = np.flatnonzero(new & (self.sorted_hashes[pos] == hashes))
            if len(maybe):  # a repeat, or (rarely) a hash collision: compare the strings
                seen = pa.concat_arrays([k.cast(pa.large_string()) for k in self.keys])
                found = pc.is_in(keys.take(pa.array(maybe)).cast(pa.large_string()), value_set=seen)
                new[maybe[found.to_numpy(zero_copy_only=False)]] = False
        return new

    def add(self, keys: pa.Array, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Keep new keys (``first``'s rows only)."""
        self.keys.append(keys)
        self.hashes.append(hashes)
        self.rows.append(np.asarray(rows, dtype=np.int64))
        self.sorted_hashes = np.sort(np.concatenate([self.sorted_hashes, hashes]), kind="stable")

    def split(self, shard: str, n: int) -> Iterator[tuple[int, tuple]]:
        """-> (bucket, (shard, keys, rows)) per non-empty bucket of the kept keys."""
        if not self.keys:
            return
        keys = pa.concat_arrays([k.cast(pa.large_string()) for k in self.keys])
        yield from split_key_arrays(shard, keys, np.concatenate(self.rows), n, np.concatenate(self.hashes))
