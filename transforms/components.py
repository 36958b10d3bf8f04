"""Connected components of a keyed edge list, distributed and batched: local stars per bucket.

Edges are (lo, hi) key pairs. Directed edges are cut into lists by a stable hash bucket of their
source node (``buckets`` set by the graph from the input's size), and every round is one
``GroupByKey`` over buckets: a bucket holds every edge of each of its nodes. A round
(``local_star``) finds the connected components of the bucket's edges (``scipy.sparse.csgraph``
on the nodes factorised to sorted integer codes with ``np.unique``) and replaces each by a star
around its smallest node, both ways, keyed by the source's bucket for the next round. Each edge
lies inside one such component and each star joins only connected nodes, so the components of
the whole graph never change, while every node's label falls to the smallest node it reaches
through its bucket's edges: with one bucket a round is union-find on the whole graph; with many
it is at least a min-label step over each node's neighbourhood plus every merge the bucket sees.
Nodes are either keys (lists of strings, bucket ``key_batches.bucket_of``) or, as
``FindDuplicates`` runs it (``ids=True``), stable 64-bit ids of the keys
(``key_batches.key_ids``) in int64 arrays, bucket = id mod buckets: no Python object per key, and
the root is then the smallest id. A step emits one list pair per (input bucket, output bucket);
no element holds more than one bucket's edges, and the first batching holds at most ``BATCH``
edges.

The rounds are unrolled in the graph, ``rounds_for(buckets)`` by default (6 for the 2 buckets of
a million rows, at most 16): a shuffled path of 100,000 nodes needs 1 round in one bucket, 2 in
two, 8 in 16 and 14 in 256, and duplicate clusters (the cell search emits breadth-first forests,
so copies of one image arrive as a star) 1-2. The last step groups once more and checks, node by
node, that the result is a union of stars (each node either has only larger neighbours, or
exactly one neighbour, smaller): a local test that holds everywhere only when the whole graph
has converged. If it fails anywhere, the job fails loudly, naming the setting. Results depend on
neither bucketing nor arrival order.

``large_star`` / ``small_star`` (Kiveris et al., "Connected Components in MapReduce and Beyond",
SoCC 2014: two shuffles a round, O(log n) rounds; a sorted path of 10,000 nodes: 14 pairs) are
kept as the reference the tests run the rounds' contract against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np

from transforms.key_batches import BufferedBuckets, buckets_of, sorted_unique

BATCH = 50_000  # directed edges per list out of the first batching step


class NotConverged(RuntimeError):
    pass


Lists = tuple  # (sources, destinations), one directed edge per position: lists of keys or int64 id arrays


def _as_array(keys: list[str]) -> np.ndarray:
    """Fixed-width unicode sorts by code point like ``str``; keys holding a NUL (numpy's fixed
    width strips trailing ones) fall back to objects, compared by Python."""
    if not keys or "\x00" in "".join(keys):
        return np.array(keys, dtype=object)
    return np.array(keys)


def _is_ids(part) -> bool:
    return isinstance(part, np.ndarray) and part.dtype.kind in "iu"


def _nodes(parts: list) -> np.ndarray:
    """Lists of nodes -> one array: int64 ids stay integers, keys become a string array."""
    if all(_is_ids(p) for p in parts):
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)
    flat: list = []
    for p in parts:
        flat.extend(p.tolist() if isinstance(p, np.ndarray) else p)
    return _as_array(flat)


def _factorize(lists: Iterable[Lists]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lists of directed edges -> (sorted unique nodes, source codes, destination codes), the
    (source, destination) code pairs deduplicated and sorted by source, then destination."""
    src: list = []
    dst: list = []
    for s, d in lists:
        if len(s):
            src.append(s)
            dst.append(d)
    if not src:
        empty = np.zeros(0, dtype=np.int64)
        return np.array([], dtype=object), empty, empty
    nodes = _nodes(src + dst)
    n_src = sum(len(s) for s in src)
    uniq, inv = np.unique(nodes, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    k = len(uniq)
    pairs = sorted_unique(inv[:n_src] * k + inv[n_src:])
    return uniq, pairs // k, pairs % k


def _out(values: np.ndarray):
    """What a list of nodes travels as: int64 ids as an array, keys as a Python list."""
    return values if values.dtype.kind in "iu" else values.tolist()


def _runs(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted codes -> (start index, length) of each run of equal values."""
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    return starts, np.diff(np.r_[starts, len(u)])


def _split(uniq: np.ndarray, src: np.ndarray, dst: np.ndarray, n: int) -> Iterator[tuple[int, Lists]]:
    """Directed edges (codes into ``uniq``) -> (bucket of the source, (sources, destinations))."""
    if not len(src):
        return
    used = sorted_unique(src)
    bucket = np.full(len(uniq), -1, dtype=np.int64)
    bucket[used] = buckets_of(uniq[used], n)
    b = bucket[src]
    order = np.argsort(b, kind="stable")
    cuts = np.flatnonzero(np.diff(b[order])) + 1
    for part in np.split(order, cuts):
        yield int(b[part[0]]), (_out(uniq[src[part]]), _out(uniq[dst[part]]))


def _both_ways(uniq: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int) -> Iterator[tuple[int, Lists]]:
    yield from _split(uniq, np.r_[lo, hi], np.r_[hi, lo], n)


def large_star(item: tuple[int, Iterable[Lists]], n: int) -> Iterator[tuple[int, Lists]]:
    """(bucket, lists of directed edges by source) -> edges (larger neighbour v -> smallest key
    m of the source's closed neighbourhood), keyed by v's bucket for small-star."""
    uniq, u, v = _factorize(item[1])
    if not len(u):
        return
    starts, counts = _runs(u)
    low = np.repeat(np.minimum(u[starts], v[starts]), counts)
    keep = v > u
    yield from _split(uniq, v[keep], low[keep], n)


def small_star(item: tuple[int, Iterable[Lists]], n: int) -> Iterator[tuple[int, Lists]]:
    """(bucket, lists of node -> a smaller neighbour) -> each node and its smaller neighbours
    linked to the smallest of them, both ways, keyed by source bucket for the next step."""
    uniq, u, w = _factorize(item[1])
    if not len(u):
        return
    starts, counts = _runs(u)
    low = np.repeat(w[starts], counts)
    other = w != low
    lo = np.r_[low[other], w[starts]]
    hi = np.r_[w[other], u[starts]]
    yield from _both_ways(uniq, lo, hi, n)


def local_star(item: tuple[int, Iterable[Lists]], n: int) -> Iterator[tuple[int, Lists]]:
    """(bucket, lists of directed edges by source) -> each connected component of the bucket's
    edges (its nodes' whole neighbourhoods) as a star around its smallest node, both ways, keyed
    by source bucket for the next round. Every edge lies inside one such component and every
    star's nodes were connected: the components of the whole graph are unchanged."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    uniq, u, v = _factorize(item[1])
    if not len(u):
        return
    k = len(uniq)
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(k, k))
    _, label = connected_components(graph, directed=False)
    smallest = np.unique(label, return_index=True)[1]  # codes sort as nodes: a label's first code is its smallest
    root = smallest[label]
    other = np.flatnonzero(root != np.arange(k))
    yield from _both_ways(uniq, root[other], other, n)


def rounds_for(buckets: int) -> int:
    """Local-star rounds unrolled for ``buckets`` buckets: a shuffled path of 100,000 nodes
    converges in 1 round in one bucket, 2 in two, 8 in 16 and 14 in 256 (test_components); the
    margin doubles with the buckets' logarithm, and 16 rounds (the 8 large-star / small-star
    pairs this replaced) cap it."""
    return min(16, 4 + 2 * math.ceil(math.log2(max(1, buckets))))


def star_labels(item: tuple[int, Iterable[Lists]], rounds: int) -> Iterator[tuple[int, Lists]]:
    """(bucket, lists of directed edges by source) -> (bucket, (nodes, component ids)) when every
    node's neighbourhood is a converged star's; else ``NotConverged``."""
    bucket, lists = item
    uniq, u, v = _factorize(lists)
    if not len(u):
        return
    starts, counts = _runs(u)
    node, low = u[starts], v[starts]
    bad = (low < node) & (counts > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise NotConverged(
            f"connected components did not converge in {rounds} rounds (node {uniq[node[i]]!r} still has "
            f"{int(counts[i])} neighbours); raise FindDuplicates(rounds=...)"
        )
    yield bucket, (_out(uniq[node]), _out(uniq[np.minimum(node, low)]))


def _directed(pair: tuple[str, str]) -> Iterator[tuple[str, tuple[str, str]]]:
    """(lo, hi) -> both directions, each keyed by its source."""
    a, b = pair
    yield a, (a, b)
    yield b, (b, a)


def _as_lists(pairs: list[tuple[str, str]]) -> Lists:
    return [s for s, _ in pairs], [d for _, d in pairs]


def edge_lists(n: int) -> BufferedBuckets:
    """(lo, hi) pairs -> (bucket, (sources, destinations)) lists, both directions, per bundle."""
    return BufferedBuckets(n, _directed, BATCH, pack=_as_lists)


def id_edge_lists(pair: tuple[np.ndarray, np.ndarray], n: int) -> Iterator[tuple[int, Lists]]:
    """(lo ids, hi ids), a batch of undirected edges -> (bucket, (sources, destinations)) per
    bucket of the source, both directions (the batch is already a list: nothing buffered)."""
    lo, hi = (np.asarray(x, dtype=np.int64) for x in pair)
    if not len(lo):
        return
    src, dst = np.r_[lo, hi], np.r_[hi, lo]
    b = buckets_of(src, n)
    order = np.argsort(b, kind="stable")
    cuts = np.flatnonzero(np.diff(b[order])) + 1
    for part in np.split(order, cuts):
        yield int(b[part[0]]), (src[part], dst[part])


def root_pairs(item: tuple[int, Lists]) -> Iterator[tuple[str, str]]:
    _, (nodes, roots) = item
    yield from zip(nodes, roots, strict=True)


class Components(beam.PTransform):
    """PCollection[(key_a, key_b)] (key_a < key_b) -> PCollection[(key, smallest key of its
    component)] for every key with an edge; with ``batched``, (bucket_of(key, buckets), (keys,
    roots)) lists instead, a bucket's keys in one or more lists.

    ``ids``: the input is batches of edges on int64 node ids instead, ``(lo ids, hi ids)`` arrays
    (``key_batches.key_ids``); the output (always batched) is (id mod buckets, (id array, root
    id array)), the root the smallest id of the component (mapping ids back to keys, and the
    smallest key, is the caller's: ``transforms.dedup``)."""

    def __init__(self, rounds: int | None = None, buckets: int = 16, batched: bool = False, ids: bool = False):
        super().__init__()
        self.buckets = max(1, buckets)
        self.rounds = rounds_for(self.buckets) if rounds is None else rounds
        self.batched = batched or ids
        self.ids = ids

    def expand(self, pairs):
        n = self.buckets
        if self.ids:
            edges = pairs | "EdgeLists" >> beam.FlatMap(id_edge_lists, n=n)
        else:
            edges = pairs | "EdgeLists" >> beam.ParDo(edge_lists(n))
        for r in range(self.rounds):
            edges = edges | f"LocalStarGroup{r}" >> beam.GroupByKey() | f"LocalStar{r}" >> beam.FlatMap(local_star, n=n)
        labels = (
            edges | "StarGroup" >> beam.GroupByKey() | "StarLabels" >> beam.FlatMap(star_labels, rounds=self.rounds)
        )
        return labels if self.batched else labels | "Unbatch" >> beam.FlatMap(root_pairs)
