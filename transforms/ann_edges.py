"""Near-duplicate edges from batches of vectors, partitioned by k-means cell (no global gather).

``CellSearch`` is the Beam wiring of ``transforms.cell_search``:

    batches (keys, payload) --CombineGlobally(bounded sample + row count)--> Plan (centroids)
    batches --assign rows to cells (Plan as the only side input)--> (cell group, arrays)
            --GroupByKey--> in-cell products --> edges, final neighbours,
            neighbour candidates of rows in two cells --CombinePerKey--> neighbours

For float vectors the assignment runs in 2 parts and the cell groups travel in 4 shuffles
(group % 4, ``SPLITS``): the same cells, groups and results. Beam's in-process runner hands a
stage its whole input as one buffer, copied about three times on the way in, and re-encodes a
shuffle's whole content at once; split, no buffer holds every vector. The price: more stages,
and each shuffle's multi-input Flatten is one more pass over its part on that runner. Measured
on 1M x 512 LAION-layout rows (dedup-only job, same tables; user+sys CPU, peak RSS): splits
(1, 1) 65.1 CPU-s, 8.5 GB; (2, 4) 68.9 CPU-s, 5.3 GB; (4, 8) 72.5 CPU-s, 4.5 GB.

With a spill folder (``spill``: every job run, ``pipeline.graph``), the vectors leave Beam's data
plane: each batch and each (cell group, flush) is a file (``transforms.spill``) and only a
``SpillRef`` travels, so no stage buffer holds vectors and one part and one shuffle do
(``SPILLED_SPLITS``; 1M dedup-only: 53.0 CPU-s and 2.49 GB peak, against 61.6 CPU-s and 4.23 GB
with the vectors in Beam, docs/engines.md).

Elements through the shuffle are arrays packed into one bytes element each
(``transforms.row_blobs``: keys, float16 vectors or packed codes, cell ids), one per cell group
and assignment bundle, never one element per row. ``VectorEdges`` (CLIP, LAION embeddings) and
``FindPhashCopies`` use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import Edge, EdgeBatch, Neighbour
from transforms import cell_plan, row_blobs, spill
from transforms import cell_search as cs
from transforms.cell_plan import SampleRows, _smallest  # noqa: F401  (their home before cell_plan)

SAMPLE_CAP = 100_000  # rows kept for k-means training (the sample is one bounded element)
SPLITS = (2, 4)  # float vectors: assigned in 2 parts, cell groups in 4 shuffles (group % 4)
SPILLED_SPLITS = (1, 1)  # spilled vectors: no buffer to split (1M dedup-only: 53.0 CPU-s, 2.49 GB vs 54.2, 2.60)
FLUSH_ROWS = 65_536  # rows an assignment step holds before sending them on, one element per group
TARGET_GROUP_ROWS = 200_000  # rows (with second cells) per shuffle group: groups = n / this
PARTIAL_BUCKETS = 64  # key-hash buckets combining the neighbours of rows in several cells (batched)


def _plan(stats, vectorize: Callable, query_rows: tuple, settings: dict) -> cs.Plan:
    n, payload = stats
    k = cs.choose_cells(n, settings["single_cell_below"], settings["requested_cells"]) if n >= 2 else 1
    if payload is None or k <= 1:
        return cs.Plan(None, 1, settings["margin"], settings["top_m"] >= 2)  # one cell: no vectors needed
    h = vectorize(payload[:1]).shape[1]
    q = [r for r in query_rows if r < h] or [0]
    rows = max(2, -(-cell_plan.training_rows(k, settings["sample_size"]) // len(q)))
    vecs = vectorize(payload[:rows])  # only the rows k-means trains on
    return cs.make_plan(n, vecs[:, q].reshape(-1, vecs.shape[2]), **settings)


def _queries(payload: np.ndarray, vectorize: Callable, query_rows: tuple) -> np.ndarray:
    """(m, Q, d) query vectors of stored rows; float16 embeddings as they are (``assign`` casts
    them to bf16 directly, the same values as through float32)."""
    vecs = payload if vectorize is float_vectors else vectorize(payload)
    q = [r for r in query_rows if r < vecs.shape[1]] or [0]
    return vecs if q == list(range(vecs.shape[1])) else vecs[:, q]


class AssignCells(beam.DoFn):
    """Batches -> (cell group, (keys, payload, cells, groups)) tagged with the group's shuffle
    (group % splits). A batch's rows of one group are a few dozen (64 groups); they are held and
    sent as one element per group once ``flush_rows`` rows are held (and at the bundle's end):
    ~1,000 shuffle elements for 1M rows instead of ~16,000, each encoded, grouped and decoded."""

    def __init__(
        self, vectorize: Callable, query_rows: tuple, splits: int, flush_rows: int = FLUSH_ROWS, spill: str = ""
    ):
        self.vectorize, self.query_rows, self.splits, self.flush_rows = vectorize, query_rows, splits, flush_rows
        self.spill = spill  # a folder: each group's rows go to a file there, a SpillRef travels

    def start_bundle(self):
        self.held, self.rows, self.groups = {}, 0, 1

    def process(self, batch, plan: cs.Plan) -> Iterator:
        keys, payload = row_blobs.rows_of(batch)[:2]
        if not len(keys):
            return
        self.groups = plan.groups
        if plan.centroids is None:  # one cell: nothing to compare with
            self._hold(0, keys, payload, np.zeros((len(keys), 1), dtype=np.int32))
        else:
            cells = cs.assign(_queries(payload, self.vectorize, self.query_rows), plan)
            for g, rows in _group_rows_of(cs.groups_of(cells, plan.groups)):
                self._hold(g, keys[rows], (payload, rows), cells[rows])
        if self.rows >= self.flush_rows:
            yield from self._flush(lambda v: v)

    def finish_bundle(self) -> Iterator:
        from apache_beam.transforms.window import GlobalWindows

        yield from self._flush(GlobalWindows.windowed_value)

    def _hold(self, g: int, keys, payload, cells) -> None:
        self.held.setdefault(g, []).append((keys, payload, cells))
        self.rows += len(keys)

    def _flush(self, wrap: Callable) -> Iterator:
        held, self.held, self.rows = self.held, {}, 0
        for g in sorted(held):
            parts = held.pop(g)
            arrays = [np.concatenate([p[0] for p in parts]), row_blobs.gathered([p[1] for p in parts])]
            arrays.append(np.concatenate([p[2] for p in parts]))
            value = (
                spill.write(self.spill, *arrays, self.groups) if self.spill else row_blobs.pack(*arrays, self.groups)
            )
            yield beam.pvalue.TaggedOutput(str(g % self.splits), wrap((g, value)))


def _group_rows_of(in_group: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(m, C) shuffle group of each row's cells (-1: none) -> (group, its rows ascending) per
    group, ascending: one sort of the (group, row) pairs, not one scan of every row per group."""
    r, c = np.nonzero(in_group >= 0)
    m = max(1, len(in_group))
    pairs = np.unique(in_group[r, c].astype(np.int64) * m + r)  # a row twice in a group: once
    if not len(pairs):
        return
    groups, rows = np.divmod(pairs, m)
    cuts = np.flatnonzero(np.diff(groups)) + 1
    yield from zip(groups[np.r_[0, cuts]].tolist(), np.split(rows, cuts), strict=True)


class _RoundRobin:
    """Partition function: batches dealt in turn (any split gives the same cells)."""

    def __init__(self):
        self.turn = -1

    def __call__(self, batch, n: int) -> int:
        self.turn += 1
        return self.turn % n


def _group_rows(pieces: list) -> tuple:
    """A group's pieces -> (keys, payload, cells, groups), each array one concatenation. Spilled
    pieces are read one at a time into the payload array (their sizes are in the references):
    the group's vectors are held once, not twice."""
    if not all(isinstance(p, spill.SpillRef) for p in pieces):
        rows = [row_blobs.rows_of(p) for p in pieces]
        return (*(np.concatenate([r[i] for r in rows]) for i in range(3)), rows[0][3])
    keys, cells, payload, pos = [], [], None, 0
    for ref in pieces:
        k, v, c, groups = row_blobs.rows_of(ref)
        if payload is None:
            payload = np.empty((sum(p.rows for p in pieces), *v.shape[1:]), dtype=v.dtype)
        payload[pos : pos + len(v)] = v
        pos += len(v)
        keys.append(k), cells.append(c)
    return np.concatenate(keys), payload, np.concatenate(cells), groups


def _search(
    item, vectorize: Callable, query_rows: tuple, threshold: float, forest: bool, cell_fn=None
) -> Iterator[dict]:
    """One shuffle group's pieces (each says how many groups there are) -> its columnar results."""
    from pipeline import progress

    progress.begin("search")
    group, pieces = item
    keys, payload, cells, groups = _group_rows(list(pieces))
    h = vectorize(payload[:1]).shape[1]
    q = tuple(r for r in query_rows if r < h) or (0,)
    found = cs.search_group(
        keys, payload, cells, group, groups, q, threshold, forest=forest, vectorize=vectorize, cell_fn=cell_fn
    )
    beam.metrics.Metrics.counter("cell_search", "pairs").inc(len(found["edges"][0]))
    progress.advance("search", len(keys))  # rows searched in this cell group (top-m: a row in m groups)
    yield found


def _edges(found: dict, embedder: str, similarity: Callable) -> Iterator[Edge]:
    a, b, s = found["edges"]
    for x, y, z in zip(a.tolist(), b.tolist(), similarity(s).tolist(), strict=True):
        yield Edge(x, y, z, embedder)


def _edge_batch(found: dict, embedder: str, similarity: Callable) -> Iterator[EdgeBatch]:
    a, b, s = found["edges"]
    if len(a):
        yield EdgeBatch(a, b, similarity(s), embedder)


def neighbour_table(key: np.ndarray, nn_key: np.ndarray, sim: np.ndarray, embedder: str):
    """Columns -> a pyarrow Table of the neighbours schema (``schemas.arrow.TABLES``)."""
    import pyarrow as pa

    from schemas import arrow

    columns = [pa.array(key, pa.string()), pa.repeat(pa.scalar(embedder, pa.string()), len(key))]
    columns += [pa.array(nn_key, pa.string()), pa.array(np.asarray(sim, np.float64))]
    return pa.Table.from_arrays(columns, schema=arrow.TABLES["neighbours"])


def _neighbours(found: dict, embedder: str, similarity: Callable) -> Iterator[Neighbour]:
    a, b, s = found["nn"]
    for x, y, z in zip(a.tolist(), b.tolist(), similarity(s).tolist(), strict=True):
        yield Neighbour(x, embedder, y, z)


def _neighbour_table(found: dict, embedder: str, similarity: Callable) -> Iterator:
    a, b, s = found["nn"]
    if len(a):
        yield neighbour_table(a, b, similarity(s), embedder)


def _partial(found: dict) -> Iterator[tuple]:
    a, b, s = found["nn_partial"]
    for x, y, z in zip(a.tolist(), b.tolist(), s.tolist(), strict=True):
        yield x, (z, y)


def _partial_buckets(found: dict) -> Iterator[tuple]:
    """Neighbour candidates of rows in several cells -> (key-hash bucket, columns)."""
    a, b, s = found["nn_partial"]
    if not len(a):
        return
    part = cs.key_priority(a, 0) % np.uint64(PARTIAL_BUCKETS)
    for p in np.unique(part).tolist():
        sel = part == p
        yield p, (a[sel], b[sel], s[sel])


def _best_table(item, embedder: str, similarity: Callable) -> Iterator:
    """One bucket's candidates -> a table of each key's best (ties: the smaller key)."""
    pieces = list(item[1])
    who, other, sim = (np.concatenate([p[i] for p in pieces]) for i in range(3))
    w, o, s = cs.best_neighbours(who, other, sim)
    yield neighbour_table(w, o, similarity(s), embedder)


def _best(candidates) -> tuple:
    """The most similar candidate; ties -> the smaller key."""
    return min(candidates, key=lambda c: (-c[0], c[1]))


def _combined_neighbour(kv, embedder: str, similarity: Callable) -> Neighbour:
    key, (sim, other) = kv
    return Neighbour(key, embedder, other, float(similarity(np.array([sim], dtype=np.float32))[0]))


def identity_similarity(s: np.ndarray) -> np.ndarray:
    return s.astype(np.float64)


def float_vectors(payload: np.ndarray) -> np.ndarray:
    """Stored (m, 1, d) float16 rows -> float32 (a new array; float16 through torch, whose
    conversion is vectorised: 8x numpy's, the same values)."""
    if payload.dtype != np.float16 or payload.size < 4096:
        return np.asarray(payload, dtype=np.float32)
    return cell_plan._tensor(np.ascontiguousarray(payload)).float().numpy()


class CellSearch(beam.PTransform):
    """(keys array, payload array) batches -> {"edges": Edge, "neighbours": Neighbour}.

    ``batched_edges``: ``EdgeBatch`` elements (one per search group) instead of one ``Edge`` per
    pair; ``batched_neighbours``: pyarrow Tables of the neighbours schema instead of one
    ``Neighbour`` per row (rows in several cells combined per key-hash bucket, as arrays).
    ``forest`` (default): a breadth-first spanning forest of each group's pairs above the
    threshold (the same clusters; a group of c copies costs c - 1 edges, not c(c-1)/2); else
    every pair once. ``cell_fn`` replaces the in-cell search
    (``cell_search.search_cell``'s contract) and ``search_vectorize`` what it is given, one cell at
    a time (packed codes for ``transforms.hamming_search``). ``splits``: (assignment parts,
    shuffles); (1, 1) by default (perceptual-hash codes: ~100 bytes a row, no buffer to split;
    each split is a few stages more), ``SPLITS`` for float vectors."""

    def __init__(
        self,
        threshold: float,
        embedder: str,
        cluster_cfg,
        seed: int,
        vectorize: Callable = float_vectors,
        query_rows: tuple = (0,),
        similarity: Callable = identity_similarity,
        forest: bool = True,
        batched_neighbours: bool = False,
        batched_edges: bool = False,
        cell_fn: Callable | None = None,
        search_vectorize: Callable | None = None,
        splits: tuple[int, int] = (1, 1),
        spill: str = "",
    ):
        super().__init__()
        self.forest, self.spill = forest, spill
        self.cell_fn, self.search_vectorize = cell_fn, search_vectorize or vectorize
        self.batched_neighbours, self.batched_edges = batched_neighbours, batched_edges
        self.threshold, self.embedder, self.seed = threshold, embedder, seed
        self.vectorize, self.query_rows, self.similarity = vectorize, tuple(query_rows), similarity
        c = cluster_cfg
        self.cap = c.sample_size or SAMPLE_CAP
        self.assign_splits, self.shuffle_splits = splits
        self.settings = {
            "single_cell_below": getattr(c, "single_cell_below", 20_000),
            "requested_cells": c.n_cells,
            "sample_size": c.sample_size,
            "margin": getattr(c, "second_cell_margin", 0.02),
            "top_m": c.top_m,
            "target_group_rows": TARGET_GROUP_ROWS,
            "min_groups": c.cell_groups,
            "seed": seed,
        }

    def expand(self, batches):
        sampler = SampleRows(self.cap, self.seed)
        stats = batches | "SampleForCells" >> beam.CombineGlobally(sampler).without_defaults()
        plan = beam.pvalue.AsSingleton(
            stats | "TrainCells" >> beam.Map(_plan, self.vectorize, self.query_rows, self.settings), default_value=None
        )
        # Split shuffles: same cells, groups and results whatever the splits. On the in-process
        # runner a stage's whole input is one buffer (copied ~3 times on its way in) and a
        # shuffle's too: the largest of these parts, not all of them, sets the peak memory.
        parts = batches | "SplitBatches" >> beam.Partition(_RoundRobin(), self.assign_splits)
        tags = [str(i) for i in range(self.shuffle_splits)]
        assigned = [
            part
            | f"AssignCells{i}"
            >> beam.ParDo(
                AssignCells(self.vectorize, self.query_rows, self.shuffle_splits, spill=self.spill), plan
            ).with_outputs(*tags)
            for i, part in enumerate(parts)
        ]
        search = {
            "vectorize": self.search_vectorize,
            "query_rows": self.query_rows,
            "threshold": self.threshold,
            "forest": self.forest,
            "cell_fn": self.cell_fn,
        }
        found = [
            tuple(a[tag] for a in assigned)
            | f"ToShuffle{tag}" >> beam.Flatten()
            | f"ByCellGroup{tag}" >> beam.GroupByKey()
            | f"SearchCells{tag}" >> beam.FlatMap(_search, **search)
            for tag in tags
        ]
        found = tuple(found) | "Found" >> beam.Flatten()
        to_edges = _edge_batch if self.batched_edges else _edges
        edges = found | "Edges" >> beam.FlatMap(to_edges, self.embedder, self.similarity)
        return {"edges": edges, "neighbours": self._neighbours(found)}

    def _neighbours(self, found):
        e, sim = self.embedder, self.similarity
        if self.batched_neighbours:  # tables: one per search group, one per bucket of rows in several cells
            final = found | "Neighbours" >> beam.FlatMap(_neighbour_table, e, sim)
            combined = (
                found
                | "NeighbourCandidates" >> beam.FlatMap(_partial_buckets)
                | "ByKeyBucket" >> beam.GroupByKey()
                | "BestNeighbours" >> beam.FlatMap(_best_table, e, sim)
            )
        else:
            final = found | "Neighbours" >> beam.FlatMap(_neighbours, e, sim)
            combined = (
                found
                | "NeighbourCandidates" >> beam.FlatMap(_partial)
                | "BestNeighbour" >> beam.CombinePerKey(_best)
                | "NeighbourOfTwoCells" >> beam.Map(_combined_neighbour, e, sim)
            )
        return (final, combined) | "AllNeighbours" >> beam.Flatten()


def _columnar(batch, folder: str = ""):
    """(keys, vectors) -> packed (keys, (n, 1, d) float16) rows (``transforms.row_blobs``), or,
    given a spill folder, a ``SpillRef`` to a file of them (``transforms.spill``). A
    ``spill.InputRows`` (rows read again from the input file) as it is."""
    if isinstance(batch, spill.InputRows):
        return batch
    keys, vecs = batch
    v = np.asarray(vecs, dtype=np.float16)
    k, v = np.asarray(keys, dtype=str), v.reshape(len(v), 1, -1)
    return spill.write(folder, k, v) if folder else row_blobs.pack(k, v)


class VectorEdges(beam.PTransform):
    """(keys, vectors) batches -> {"edges": Edge, "neighbours": Neighbour}: cosine >= threshold.
    ``batched_edges`` / ``batched_neighbours``: columnar outputs (``CellSearch``). ``spill``: a
    folder where the vectors are written once per stage (``transforms.spill``): only references
    to them travel through the runner."""

    def __init__(
        self,
        threshold: float,
        embedder: str,
        cluster_cfg,
        seed: int,
        batched_neighbours: bool = False,
        batched_edges: bool = False,
        spill: str = "",
        splits: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.threshold, self.embedder, self.cluster_cfg, self.seed = threshold, embedder, cluster_cfg, seed
        self.batched = {"batched_neighbours": batched_neighbours, "batched_edges": batched_edges}
        self.spill = spill
        self.splits = splits or (SPILLED_SPLITS if spill else SPLITS)

    def expand(self, batches):
        search = CellSearch(
            self.threshold,
            self.embedder,
            self.cluster_cfg,
            self.seed,
            splits=self.splits,
            spill=self.spill,
            **self.batched,
        )
        return batches | "Columnar" >> beam.Map(_columnar, self.spill) | "CellSearch" >> search
