"""Duplicate clusters' captions as columns: per cluster its caption class and its (term,
cluster) pair counts, from the members of clusters of more than one.

Each record batch sends, per hash bucket of cluster ids, one element of columns (cluster ids,
normalized captions, keys, shards, cluster sizes and, for the rows of clusters of >= m records,
their terms as ids into the element's own sorted vocabulary), not a tuple per member; a bucket's
group concatenates them and works per cluster on slices (``norm_duplication``) and over the
whole bucket at once (the pair counts: one sort of (cluster, size, term) entries). The
per-member references are ``trigger_counts.clustered_members`` and ``triggers.classified``.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from transforms.key_batches import buckets_of, key_ids
from transforms.shard_columns import Batch
from transforms.trigger_counts import norm_duplication


def member_columns(batch, m: int, n: int) -> Iterator[tuple[int, tuple]]:
    """A record batch -> (bucket of the cluster id, (cluster ids, norms, keys, shards, sizes,
    vocabulary, term ids, term offsets)) per bucket holding a record of a cluster of more than
    one; the terms only of the rows in clusters of >= m records (others have none)."""
    sizes = batch.cluster_size
    rows = np.flatnonzero(sizes > 1)
    if not len(rows):
        return
    cid = batch.cluster_id
    cids = [cid[i] for i in rows.tolist()]
    buckets = buckets_of(key_ids(cids), n) if n > 1 else np.zeros(len(rows), dtype=np.int64)
    wanted = sizes >= max(m, 2)  # terms only where the pair counts read them
    counts = np.where(wanted, np.diff(batch.term_off), 0)
    entry_row = batch.term_rows()
    kept = wanted[entry_row]
    term_rows, row_term = entry_row[kept], batch.term_ids[kept]
    norm, key, shard = batch.norm, batch.key, batch.shard
    for b in np.unique(buckets).tolist():
        at = np.flatnonzero(buckets == b)
        picked = rows[at]
        ids = picked.tolist()
        keep = np.isin(term_rows, picked)
        used, local = np.unique(row_term[keep], return_inverse=True)
        off = np.zeros(len(picked) + 1, dtype=np.int64)
        np.cumsum(counts[picked], out=off[1:])
        yield (
            b,
            (
                [cids[i] for i in at.tolist()],
                [norm[i] for i in ids],
                [key[i] for i in ids],
                [shard[i] for i in ids],
                sizes[picked],
                [batch.vocab[t] for t in used.tolist()],
                local.astype(np.int32),
                off,
            ),
        )


def classified_columns(item, share: float, m: int) -> Iterator:
    """(bucket, ``member_columns`` parts) -> what ``triggers.classified`` gives for the same
    members: (cluster id, its ``norm_duplication``) per cluster; tagged "rows", (shard, Batch of
    (key, (cluster id, class))) per shard; tagged "pairs", ((term, cluster id, size), records)
    for the pairs on >= m records of clusters of >= m records."""
    _, parts = item
    parts = list(parts)
    if not parts:
        return
    cids, norms, keys, shards = ([v for part in parts for v in part[j]] for j in range(4))
    sizes = np.concatenate([part[4] for part in parts])
    names = sorted(set(cids))
    code = {c: i for i, c in enumerate(names)}
    member_code = np.fromiter((code[c] for c in cids), dtype=np.int64, count=len(cids))
    order = np.argsort(member_code, kind="stable")
    bounds = np.searchsorted(member_code[order], np.arange(len(names) + 1)).tolist()
    order_list = order.tolist()
    classes = []
    for c, name in enumerate(names):
        found = norm_duplication([norms[i] for i in order_list[bounds[c] : bounds[c + 1]]], share)
        classes.append(found["class"])
        yield name, found
    for kv in _pair_counts(parts, member_code, sizes, names, m):
        yield beam.pvalue.TaggedOutput("pairs", kv)
    rows: dict[str, Batch] = {}
    for k, s, c in zip(keys, shards, member_code.tolist(), strict=True):
        rows.setdefault(s, Batch()).append((k, (names[c], classes[c])))
    for shard, batch in sorted(rows.items()):
        yield beam.pvalue.TaggedOutput("rows", (shard, batch))


def _pair_counts(parts: list, member_code: np.ndarray, sizes: np.ndarray, names: list[str], m: int) -> list:
    """((term, cluster id, size), records) for the (cluster, size, term) entries on >= m records
    of sizes >= m, sorted by cluster id, size and term."""
    vocab = sorted({t for part in parts for t in part[5]})
    index = {t: i for i, t in enumerate(vocab)}
    terms, members, start = [], [], 0
    for part in parts:
        remap = np.array([index[t] for t in part[5]], dtype=np.int64)
        terms.append(remap[part[6]] if len(part[6]) else np.zeros(0, np.int64))
        members.append(np.repeat(np.arange(start, start + len(part[0])), np.diff(part[7])))
        start += len(part[0])
    term, member = np.concatenate(terms), np.concatenate(members)
    keep = sizes[member] >= m
    term, member = term[keep], member[keep]
    if not len(term):
        return []
    c, s = member_code[member], sizes[member]
    order = np.lexsort((term, s, c))
    c, s, term = c[order], s[order], term[order]
    first = np.ones(len(term), dtype=bool)
    first[1:] = (c[1:] != c[:-1]) | (s[1:] != s[:-1]) | (term[1:] != term[:-1])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(term)))
    at = starts[counts >= m]
    found = zip(term[at].tolist(), c[at].tolist(), s[at].tolist(), counts[counts >= m].tolist(), strict=True)
    return [((vocab[t], names[cc], ss), n) for t, cc, ss, n in found]
