"""Cluster assignments as Arrow tables: what ``FindDuplicates`` emits (one table per root
bucket, a row per clustered key, ``ASSIGNMENT_SCHEMA``) and what its consumers read of it:
rows routed to shards, the ``clusters`` table, keepers for the probe, members for caption
duplication, and ``ClusterAssignment`` elements only for consumers that key by sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from schemas.elements import ClusterAssignment

ASSIGNMENT_FIELDS = ("key", "cluster_id", "cluster_size", "is_representative", "embedder", "similarity", "shard")
ASSIGNMENT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("cluster_id", pa.string()),
        ("cluster_size", pa.int64()),
        ("is_representative", pa.bool_()),
        ("embedder", pa.string()),
        ("similarity", pa.float64()),
        ("shard", pa.string()),
    ]
)  # a ClusterAssignment per row, in its field order


def assignment_elements(table: pa.Table) -> Iterator[ClusterAssignment]:
    """An assignment table -> one ``ClusterAssignment`` per row (for consumers that key by sample)."""
    yield from map(ClusterAssignment, *(table.column(c).to_pylist() for c in ASSIGNMENT_FIELDS))


def assignment_rows(table: pa.Table) -> Iterator[tuple[str, list[tuple]]]:
    """An assignment table -> (shard, [assignment as a tuple]) per shard: tuples of plain values
    travel without a pickle per object (``transforms.shard_stage`` reads them back)."""
    for shard, part in _by_column(table, "shard"):
        yield shard, list(zip(*(part.column(c).to_pylist() for c in ASSIGNMENT_FIELDS), strict=True))


def assignment_shards(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """An assignment table -> (shard, its rows as a table) per shard: the per-shard stage reads
    them as columns (no tuple per row, a few buffers to pickle)."""
    yield from _by_column(table, "shard")


def _by_column(table: pa.Table, column: str) -> Iterator[tuple[str, pa.Table]]:
    """A table -> (value, its rows) per distinct value of a string column, in value order."""
    if not table.num_rows:
        return
    import pyarrow.compute as pc

    values = table.column(column)
    uniq = pc.unique(values)
    if len(uniq) == 1:
        yield uniq[0].as_py(), table
        return
    order = pc.sort_indices(values)
    if values.null_count:
        table, values = table.take(order), values.take(order)
        for value in uniq.sort().to_pylist():
            yield value, table.filter(pc.equal(values, value))
        return
    import numpy as np

    order = order.to_numpy()
    ordered = values.take(pa.array(order)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):  # one copy of each value's rows
        yield ordered[start], table.take(pa.array(order[start:end]))


def representatives(table: pa.Table) -> Iterator[tuple[str, str]]:
    """An assignment table -> (shard, key) of the keeper of each cluster of two or more."""
    keeps = table.column("is_representative").to_numpy(zero_copy_only=False).astype(bool)
    t = table.filter(pa.array(keeps & (table.column("cluster_size").to_numpy() > 1)))
    yield from zip(t["shard"].to_pylist(), t["key"].to_pylist(), strict=True)


def cluster_table(table: pa.Table) -> pa.Table:
    """An assignment table -> the ``clusters`` table's rows: members of clusters of two or more,
    an empty embedder read as "exact"."""
    import pyarrow.compute as pc

    t = table.filter(pc.greater(table.column("cluster_size"), 1))
    emb = pc.if_else(pc.equal(t.column("embedder"), ""), "exact", t.column("embedder"))
    names = ("key", "cluster_id", "embedder", "similarity", "cluster_size", "is_representative")
    return pa.table([emb if c == "embedder" else t.column(c) for c in names], names=list(names))
