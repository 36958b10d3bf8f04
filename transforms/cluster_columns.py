"""FindDuplicates' columnar steps: edges, ranking features and clusters as arrays, not objects.

Edges travel as ``EdgeBatch`` columns and, inside FindDuplicates, as ``Cols`` tuples (node ids,
keys, similarities, embedders, and once known the root id of their component). Nodes are stable
64-bit ids of the keys (``key_batches.key_ids``); the components run on them, so their roots are
the smallest *ids*. Ids meet keys again in two places, and both check that no two different keys
share an id (``KeyIdCollision`` names them): where the components' labels meet the members'
ranking features (per id bucket), and where a cluster's members meet its edges (per root bucket),
which is also where the cluster id becomes what it always was, the smallest key of the component
(the smallest ``key_a`` of its edges, ``key_a < key_b``). Keys are ordered there as Arrow
strings (hashed and sorted in C++, UTF-8 byte order = Python's code point order), and the
assignments come out as an Arrow table per root bucket (``ASSIGNMENT_SCHEMA``), from which
``pipeline.graph`` routes rows to shards, writes ``clusters/`` and, only where a consumer keys
by sample (trigger mining), makes ``ClusterAssignment`` elements.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa

from schemas.elements import ClusterAssignment, Edge, EdgeBatch
from transforms.assignment_tables import ASSIGNMENT_SCHEMA, assignment_elements
from transforms.key_batches import buckets_of, key_ids, sorted_unique

EDGE_BATCH = 50_000  # single Edge elements gathered into one batch per bundle (and embedder)
RANK_FIELDS = ("key", "shard", "width", "height", "original_width", "original_height", "image_bytes")

# (ids_a, ids_b, keys_a, keys_b, similarities, embedders[, root ids]): one edge per position
Cols = tuple


class KeyIdCollision(RuntimeError):
    pass


def _objects(values) -> np.ndarray:
    return values if isinstance(values, np.ndarray) and values.dtype == object else np.asarray(values, dtype=object)


def edge_batch(key_a, key_b, similarity, embedder: str) -> EdgeBatch | None:
    """Columns of edges -> one ``EdgeBatch`` with key_a < key_b (swapped where needed), self
    edges dropped, keys as object arrays; None when no edge is left."""
    a, b = _objects(key_a), _objects(key_b)
    sim = np.asarray(similarity, dtype=np.float64)
    if len(a):
        swap = (a > b).astype(bool)
        a, b = np.where(swap, b, a), np.where(swap, a, b)
        keep = (a != b).astype(bool)
        if not keep.all():
            a, b, sim = a[keep], b[keep], sim[keep]
    return EdgeBatch(a, b, sim, embedder) if len(a) else None


class EdgeColumns(beam.DoFn):
    """``Edge`` or ``EdgeBatch`` elements -> normalised ``EdgeBatch`` elements (``edge_batch``):
    batches pass through, single edges are gathered per bundle and embedder."""

    def start_bundle(self):
        self.single: dict[str, list] = {}
        self.size = 0

    def process(self, e) -> Iterator[EdgeBatch]:
        if isinstance(e, EdgeBatch):
            batch = edge_batch(e.key_a, e.key_b, e.similarity, e.embedder)
            if batch is not None:
                yield batch
            return
        self.single.setdefault(e.embedder, []).append((e.key_a, e.key_b, e.similarity))
        self.size += 1
        if self.size >= EDGE_BATCH:
            yield from self._flush()

    def _flush(self) -> Iterator[EdgeBatch]:
        single, self.single, self.size = self.single, {}, 0
        for embedder, rows in sorted(single.items()):
            a, b, s = zip(*rows, strict=True)
            batch = edge_batch(list(a), list(b), list(s), embedder)
            if batch is not None:
                yield batch

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for batch in self._flush():
            yield WindowedValue(batch, 0, [GlobalWindow()])


def single_edges(batch: EdgeBatch) -> Iterator[Edge]:
    yield from batch.edges()


def id_columns(batch: EdgeBatch) -> Cols:
    """A normalised EdgeBatch -> Cols (its keys' ids computed once)."""
    emb = np.empty(len(batch), dtype=object)
    emb[:] = batch.embedder
    return (key_ids(batch.key_a), key_ids(batch.key_b), batch.key_a, batch.key_b, batch.similarity, emb)


def id_pairs(cols: Cols) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(cols[0], cols[1]), np.maximum(cols[0], cols[1])


def _take(cols: Cols, index) -> Cols:
    return tuple(c[index] for c in cols)


def _concat(parts: list[Cols]) -> Cols:
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


def split_by(cols: Cols, column: int, n: int) -> Iterator[tuple[int, Cols]]:
    """Cols -> (bucket of the ids in ``column``, the rows of that bucket) per bucket."""
    if not len(cols[0]):
        return
    b = buckets_of(cols[column], n)
    order = np.argsort(b, kind="stable")
    cuts = np.flatnonzero(np.diff(b[order])) + 1
    for part in np.split(order, cuts):
        yield int(b[part[0]]), _take(cols, part)


def _labels(lists) -> tuple[np.ndarray, np.ndarray]:
    """Lists of (ids, root ids) -> both arrays sorted by id."""
    lists = list(lists)
    if not lists:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids = np.concatenate([np.asarray(i, np.int64) for i, _ in lists])
    roots = np.concatenate([np.asarray(r, np.int64) for _, r in lists])
    order = np.argsort(ids, kind="stable")
    return ids[order], roots[order]


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (positions in ``sorted_ids``, found mask) of ``ids``."""
    if not len(sorted_ids):
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids


def feature_tables(table: pa.Table, n: int, with_meta: bool) -> Iterator[tuple[int, pa.Table]]:
    """An info batch -> (id bucket, its rows' ranking features and ids) per bucket: columns only."""
    if not table.num_rows:
        return
    names = list(RANK_FIELDS) + (["meta_json"] if with_meta else [])
    ids = key_ids(table.column("key"))
    features = table.select(names).append_column("id", pa.array(ids, pa.int64()))
    b = buckets_of(ids, n)
    order = np.argsort(b, kind="stable")
    cuts = np.flatnonzero(np.diff(b[order])) + 1
    for part in np.split(order, cuts):
        yield int(b[part[0]]), features.take(pa.array(part))


def members(item, n: int) -> Iterator[tuple[int, pa.Table]]:
    """(id bucket, {"root": [(ids, roots)], "features": tables}) -> (root bucket, the clustered
    keys' features with their "root" id); a key repeated across shards: its first shard's row."""
    _, joined = item
    yield from _members(*_labels(joined["root"]), joined["features"], n)


def _members(node: np.ndarray, root: np.ndarray, features, n: int) -> Iterator[tuple[int, pa.Table]]:
    tables = [t for t in features if t.num_rows]
    if not len(node) or not tables:
        return
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    pos, hit = _lookup(node, t.column("id").to_numpy())
    if not hit.any():
        return
    t = t.filter(pa.array(hit)).append_column("root", pa.array(root[pos[hit]], pa.int64()))
    t = t.sort_by([("key", "ascending"), ("shard", "ascending")])
    keys = t.column("key").to_numpy(zero_copy_only=False)
    first = np.r_[True, keys[1:] != keys[:-1]]
    if not first.all():
        t, keys = t.filter(pa.array(first)), keys[first]
    _code_collision(t.column("id").to_numpy(), np.arange(len(keys)), keys, "FindDuplicates/MemberOf")  # keys unique
    b = buckets_of(t.column("root").to_numpy(), n)
    order = np.argsort(b, kind="stable")
    cuts = np.flatnonzero(np.diff(b[order])) + 1
    for part in np.split(order, cuts):
        yield int(b[part[0]]), t.take(pa.array(part))


def edges_to_clusters(item, n: int) -> Iterator[tuple[int, Cols]]:
    """(bucket of id_a, {"root": [(ids, roots)], "edge": [Cols]}) -> (root bucket, Cols + root)."""
    _, joined = item
    yield from _edges(*_labels(joined["root"]), joined["edge"], n)


def _edges(node: np.ndarray, root: np.ndarray, edges, n: int) -> Iterator[tuple[int, Cols]]:
    parts = [c for c in edges if len(c[0])]
    if not parts:
        return
    cols = _concat(parts)
    pos, hit = _lookup(node, cols[0])
    if not hit.all():  # every node with an edge has a label
        raise RuntimeError("FindDuplicates: an edge's node has no component label")
    yield from split_by((*cols, root[pos]), 6, n)


def labelled(item, n: int) -> Iterator[tuple[int, tuple[str, object]]]:
    """(id bucket, {"root": [(ids, roots)], "features": tables, "edge": [Cols]}) -> (root bucket,
    ("member", ``members``' table)) and (root bucket, ("edge", ``edges_to_clusters``' Cols)):
    the labels meet the features and the edges in one join. Ticks "dedup" for the samples alone."""
    from pipeline import progress

    _, joined = item
    node, root = _labels(joined["root"])
    features = [t for t in joined["features"] if t.num_rows]
    n_clustered = 0
    for b, t in _members(node, root, features, n):
        n_clustered += t.num_rows
        yield b, ("member", t)
    for b, cols in _edges(node, root, joined["edge"], n):
        yield b, ("edge", cols)
    # a sample alone is done here; a clustered one when its cluster is assigned (``assign_tables``)
    progress.advance("dedup", sum(t.num_rows for t in features) - n_clustered)


def _by_tag(item) -> tuple[int, dict]:
    """(root bucket, [(tag, value)]) -> (root bucket, {"member": [...], "edge": [...]})."""
    bucket, values = item
    joined: dict = {"member": [], "edge": []}
    for tag, value in values:
        joined[tag].append(value)
    return bucket, joined


EMBEDDER_RANK = {"exact": 0, "pixels": 1, "phash": 2, "clip": 3, "previous": 4}


def _firsts(sorted_values: np.ndarray) -> np.ndarray:
    """Sorted values -> the index of the first of each run."""
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) if len(sorted_values) else sorted_values


def _floats(t: pa.Table, column: str) -> np.ndarray:
    """An integer column -> floats, nulls as 0."""
    return np.nan_to_num(t.column(column).to_numpy(zero_copy_only=False).astype(float))


def _keeper_rank(t: pa.Table, key_code: np.ndarray, policy: str) -> np.ndarray:
    """Members -> an int rank per member, smaller first (``dedup.keeper_sort_key``'s order)."""
    if policy in ("resolution", "centre"):  # dedup._resolution_rank, vectorised
        col = {
            c: np.maximum(np.nan_to_num(t.column(c).to_numpy(zero_copy_only=False).astype(float)), 0)
            for c in RANK_FIELDS[2:]
        }
        decoded = col["width"].astype(np.int64) * col["height"].astype(np.int64)
        ow, oh = col["original_width"].astype(np.int64), col["original_height"].astype(np.int64)
        original = np.where((ow > 0) & (oh > 0), ow * oh, decoded)
        n_bytes = _floats(t, "image_bytes").astype(np.int64)
        per_pixel = np.divide(n_bytes, decoded, out=np.zeros(len(decoded)), where=decoded != 0)
        order = np.lexsort((key_code, -per_pixel, -decoded, -original))
    elif policy == "earliest":
        order = np.argsort(key_code, kind="stable")
    else:
        from schemas.elements import SampleInfo
        from transforms.dedup import keeper_sort_key

        rank = keeper_sort_key(policy)
        rows = t.select([c for c in ("key", "meta_json") if c in t.column_names]).to_pylist()
        infos = [SampleInfo(r["key"], "", "", "", "", "", 0, 0, r.get("meta_json") or "{}") for r in rows]
        order = np.array(sorted(range(len(infos)), key=lambda i: rank(infos[i])), dtype=np.int64)
    out = np.empty(len(order), np.int64)
    out[order] = np.arange(len(order))
    return out


def assign_tables(item, policy: str) -> Iterator[pa.Table]:
    """(root bucket, [("member" | "edge", value)]) -> ``assignment_table``, one per root bucket."""
    table = assignment_table(_by_tag(item), policy)
    if table is not None and table.num_rows:
        from pipeline import progress

        progress.advance("dedup", table.num_rows)
        yield table


def _key_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys -> (sorted unique keys, each key's code into them): codes in Python's ``str`` order
    (UTF-8 byte order is code point order), hashed and sorted in Arrow, not as Python objects."""
    import pyarrow.compute as pc

    try:
        arr = pa.array(keys, pa.large_string())
    except (pa.ArrowException, UnicodeEncodeError):  # lone surrogates: Python's comparisons
        uniq, code = np.unique(keys, return_inverse=True)
        return uniq, code.reshape(-1).astype(np.int64)
    uniq = pc.unique(arr)
    uniq = uniq.take(pc.array_sort_indices(uniq))
    code = pc.index_in(arr, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
    return uniq.to_numpy(zero_copy_only=False), code


def _code_collision(ids: np.ndarray, codes: np.ndarray, uniq: np.ndarray, where: str) -> None:
    """Raise ``KeyIdCollision`` if two different key codes share an id."""
    if not len(ids):
        return
    order = np.lexsort((codes, ids))
    i, c = ids[order], codes[order]
    clash = np.flatnonzero((i[1:] == i[:-1]) & (c[1:] != c[:-1]))
    if len(clash):
        j = clash[0]
        a, b = sorted((str(uniq[c[j]]), str(uniq[c[j + 1]])))
        raise KeyIdCollision(
            f"{where}: keys {a!r} and {b!r} share the 64-bit id {int(i[j])} "
            "(transforms.key_batches.key_ids); rename one of them"
        )


def assign_clusters(item, policy: str) -> Iterator[ClusterAssignment]:
    """``assignment_table`` as ``ClusterAssignment`` objects."""
    table = assignment_table(item, policy)
    if table is not None:
        yield from assignment_elements(table)


def assignment_table(item, policy: str) -> pa.Table | None:
    """(root bucket, {"member": feature tables with "root", "edge": Cols with root}) -> every
    member's assignment as a row (``ASSIGNMENT_SCHEMA``): the keeper first by ``policy``, each
    member's strongest embedder (exact > pixels > phash > clip, then the higher similarity) and
    its similarity to the keeper (a direct edge's, else its strongest edge's); cluster id: the
    component's smallest key."""
    _, joined = item
    tables = [t for t in joined["member"] if t.num_rows]
    parts = [c for c in joined["edge"] if len(c[0])]
    if not tables or not parts:
        return None
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    ia, ib, ka, kb, sim, emb, eroot = _concat(parts)
    m_keys = t.column("key").to_numpy(zero_copy_only=False)
    m_ids, m_root = t.column("id").to_numpy(), t.column("root").to_numpy()
    uniq, code = _key_codes(np.concatenate([ka, kb, m_keys]))  # codes in key order (Python's)
    _code_collision(np.concatenate([ia, ib, m_ids]), code, uniq, "FindDuplicates/Assign")
    n_e = len(ka)
    ca, cb, cm = code[:n_e], code[n_e : 2 * n_e], code[2 * n_e :]
    roots = sorted_unique(eroot)
    e_root = np.searchsorted(roots, eroot)
    m_root_i = np.searchsorted(roots, m_root)
    cluster_code = np.full(len(roots), len(uniq), np.int64)
    np.minimum.at(cluster_code, e_root, ca)  # key_a < key_b: the smallest key is some edge's key_a
    # keeper: the first member of each root by the policy's rank
    rank = _keeper_rank(t, cm, policy)
    order = np.lexsort((rank, m_root_i))
    first = order[_firsts(m_root_i[order])]
    has_keeper = np.full(len(roots), -1, np.int64)
    has_keeper[m_root_i[first]] = cm[first]
    size = np.bincount(m_root_i, minlength=len(roots))
    # each node's strongest link: smallest embedder rank, then highest similarity, then name
    emb_names, emb_code = np.unique(emb.astype(str), return_inverse=True)
    erank = np.array([EMBEDDER_RANK.get(e, 9) for e in emb_names.tolist()], np.int64)[emb_code.reshape(-1)]
    node = np.r_[ca, cb]
    d_rank, d_sim, d_emb = np.r_[erank, erank], np.r_[sim, sim], np.tile(emb_code.reshape(-1), 2)
    order = np.lexsort((d_emb, -d_sim, d_rank, node))
    best = order[_firsts(node[order])]
    best_node = node[best]
    # a direct edge to the keeper: its highest similarity
    kc = has_keeper[e_root]
    to_keeper = np.r_[cb == kc, ca == kc]
    other = np.r_[ca, cb][to_keeper]
    dsim = d_sim[to_keeper]
    order = np.lexsort((-dsim, other))
    direct_i = order[_firsts(other[order])]
    direct_node, direct_sim = other[direct_i], dsim[direct_i]
    bpos, bhit = _lookup(best_node, cm)
    dpos, dhit = _lookup(direct_node, cm)
    is_keeper = cm == has_keeper[m_root_i]
    similarity = np.where(
        is_keeper,
        1.0,
        np.where(dhit, direct_sim[dpos] if len(direct_sim) else 1.0, np.where(bhit, d_sim[best][bpos], 1.0)),
    )
    embedder = np.where(bhit, emb_names[d_emb[best][bpos]], "")
    columns = [
        t.column("key").combine_chunks().cast(pa.string()),
        pa.array(uniq[cluster_code[m_root_i]], pa.string()),
        pa.array(size[m_root_i], pa.int64()),
        pa.array(is_keeper, pa.bool_()),
        pa.array(embedder.astype(object), pa.string()),
        pa.array(similarity.astype(np.float64), pa.float64()),
        t.column("shard").combine_chunks().cast(pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=ASSIGNMENT_SCHEMA)
