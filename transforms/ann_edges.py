"""Near-duplicate edges from batches of vectors, partitioned by k-means cell (no global gather).

``CellSearch`` is the Beam wiring of ``transforms.cell_search``:

    batches (keys, payload) --CombineGlobally(bounded sample + row count)--> Plan (centroids)
    batches --assign rows to cells (Plan as the only side input)--> (cell group, arrays)
            --GroupByKey--> in-cell products --> edges, final neighbours,
            neighbour candidates of rows in two cells --CombinePerKey--> neighbours

Elements through the shuffle are arrays (keys, float16 vectors or packed codes, cell ids), never
one element per row. ``VectorEdges`` (CLIP, LAION embeddings) and ``FindPhashCopies`` use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import Edge, Neighbour
from transforms import cell_search as cs

SAMPLE_CAP = 100_000  # rows kept for k-means training (the sample is one bounded element)
TARGET_GROUP_ROWS = 200_000  # rows (with second cells) per shuffle group: groups = n / this


class SampleRows(beam.CombineFn):
    """Batches -> (row count, the ``cap`` rows of smallest key priority): order-independent.

    The accumulator is [row count, pieces]: pieces are only merged (sorted and cut to ``cap``)
    once they hold more than 2 x ``cap`` rows, so many small batches cost no repeated sorts."""

    def __init__(self, cap: int, seed: int):
        self.cap, self.seed = cap, seed

    def create_accumulator(self):
        return [0, []]

    def add_input(self, acc, batch):
        keys, payload = batch
        prio = cs.key_priority(keys, self.seed)
        take = np.argsort(prio, kind="stable")[: self.cap]
        acc[0] += len(keys)
        acc[1].append((prio[take], np.asarray(keys)[take], payload[take]))
        if sum(len(p[0]) for p in acc[1]) > 2 * self.cap:
            acc[1] = self._merge(acc[1])
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        pieces = [p for a in accs for p in a[1]]
        return [sum(a[0] for a in accs), self._merge(pieces) if len(pieces) > 1 else pieces]

    def _merge(self, pieces):
        full = [p for p in pieces if len(p[0])]
        if not full:
            return []
        prio = np.concatenate([p[0] for p in full])
        keys = np.concatenate([p[1] for p in full])
        take = np.lexsort((keys, prio))[: self.cap]
        return [(prio[take], keys[take], np.concatenate([p[2] for p in full])[take])]

    def extract_output(self, acc):
        pieces = self._merge(acc[1])
        return acc[0], (pieces[0][2] if pieces else None)


def _plan(stats, vectorize: Callable, query_rows: tuple, settings: dict) -> cs.Plan:
    n, payload = stats
    if payload is None or n < 2 or cs.choose_cells(n, settings["single_cell_below"], settings["requested_cells"]) <= 1:
        return cs.Plan(None, 1, settings["margin"], settings["top_m"] >= 2)  # one cell: no vectors needed
    vecs = vectorize(payload)
    q = [r for r in query_rows if r < vecs.shape[1]] or [0]
    sample = vecs[:, q].reshape(-1, vecs.shape[2])
    return cs.make_plan(n, sample, **settings)


def _assign(batch, plan: cs.Plan, vectorize: Callable, query_rows: tuple) -> Iterator:
    keys, payload = batch
    if not len(keys):
        return
    if plan.centroids is None:  # one cell: nothing to compare with
        yield 0, (keys, payload, np.zeros((len(keys), 1), dtype=np.int32), plan.groups)
        return
    vecs = vectorize(payload)
    q = [r for r in query_rows if r < vecs.shape[1]] or [0]
    cells = cs.assign(vecs[:, q], plan)
    in_group = cs.groups_of(cells, plan.groups)
    for g in np.unique(in_group[in_group >= 0]):
        rows = np.flatnonzero((in_group == g).any(axis=1))
        yield int(g), (keys[rows], payload[rows], cells[rows], plan.groups)


def _search(
    item, vectorize: Callable, query_rows: tuple, threshold: float, forest: bool, cell_fn=None
) -> Iterator[dict]:
    """One shuffle group's pieces (each says how many groups there are) -> its columnar results."""
    from pipeline import progress

    progress.begin("search")
    group, pieces = item
    pieces = list(pieces)
    groups = pieces[0][3]
    keys = np.concatenate([p[0] for p in pieces])
    vecs = vectorize(np.concatenate([p[1] for p in pieces]))
    cells = np.concatenate([p[2] for p in pieces])
    q = tuple(r for r in query_rows if r < vecs.shape[1]) or (0,)
    found = cs.search_group(keys, vecs, cells, group, groups, q, threshold, forest=forest, cell_fn=cell_fn)
    beam.metrics.Metrics.counter("cell_search", "pairs").inc(len(found["edges"][0]))
    progress.advance("search", len(keys))  # rows searched in this cell group (top-m: a row in m groups)
    yield found


def _edges(found: dict, embedder: str, similarity: Callable) -> Iterator[Edge]:
    a, b, s = found["edges"]
    for x, y, z in zip(a.tolist(), b.tolist(), similarity(s).tolist(), strict=True):
        yield Edge(x, y, z, embedder)


def _neighbours(found: dict, embedder: str, similarity: Callable) -> Iterator[Neighbour]:
    a, b, s = found["nn"]
    for x, y, z in zip(a.tolist(), b.tolist(), similarity(s).tolist(), strict=True):
        yield Neighbour(x, embedder, y, z)


def _partial(found: dict) -> Iterator[tuple]:
    a, b, s = found["nn_partial"]
    for x, y, z in zip(a.tolist(), b.tolist(), s.tolist(), strict=True):
        yield x, (z, y)


def _best(candidates) -> tuple:
    """The most similar candidate; ties -> the smaller key."""
    return min(candidates, key=lambda c: (-c[0], c[1]))


def _combined_neighbour(kv, embedder: str, similarity: Callable) -> Neighbour:
    key, (sim, other) = kv
    return Neighbour(key, embedder, other, float(similarity(np.array([sim], dtype=np.float32))[0]))


def identity_similarity(s: np.ndarray) -> np.ndarray:
    return s.astype(np.float64)


def float_vectors(payload: np.ndarray) -> np.ndarray:
    """Stored (m, 1, d) float16 rows -> float32."""
    return np.asarray(payload, dtype=np.float32)


class CellSearch(beam.PTransform):
    """(keys array, payload array) batches -> {"edges": Edge, "neighbours": Neighbour (or, with
    ``batched_neighbours``, lists of Neighbour)}.

    ``forest`` (default): each cell emits a breadth-first spanning forest of its pairs above the
    threshold (the same clusters; a group of c copies costs c - 1 edges, not c(c-1)/2); else every
    pair once. ``cell_fn`` replaces the in-cell search (``cell_search.search_cell``'s contract) and
    ``search_vectorize`` what it is given (packed codes for ``transforms.hamming_search``)."""

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
        cell_fn: Callable | None = None,
        search_vectorize: Callable | None = None,
    ):
        super().__init__()
        self.forest = forest
        self.cell_fn, self.search_vectorize = cell_fn, search_vectorize or vectorize
        self.batched_neighbours = batched_neighbours
        self.threshold, self.embedder, self.seed = threshold, embedder, seed
        self.vectorize, self.query_rows, self.similarity = vectorize, tuple(query_rows), similarity
        c = cluster_cfg
        self.cap = c.sample_size or SAMPLE_CAP
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
        plan = stats | "TrainCells" >> beam.Map(_plan, self.vectorize, self.query_rows, self.settings)
        found = (
            batches
            | "AssignCells"
            >> beam.FlatMap(_assign, beam.pvalue.AsSingleton(plan, default_value=None), self.vectorize, self.query_rows)
            | "ByCellGroup" >> beam.GroupByKey()
            | "SearchCells"
            >> beam.FlatMap(
                _search,
                vectorize=self.search_vectorize,
                query_rows=self.query_rows,
                threshold=self.threshold,
                forest=self.forest,
                cell_fn=self.cell_fn,
            )
        )
        edges = found | "Edges" >> beam.FlatMap(_edges, self.embedder, self.similarity)
        combined = (
            found
            | "NeighbourCandidates" >> beam.FlatMap(_partial)
            | "BestNeighbour" >> beam.CombinePerKey(_best)
            | "NeighbourOfTwoCells" >> beam.Map(_combined_neighbour, self.embedder, self.similarity)
        )
        if self.batched_neighbours:  # one list per search group; rows in two cells stay one element each
            final = found | "Neighbours" >> beam.Map(
                lambda f, e, sim: list(_neighbours(f, e, sim)), self.embedder, self.similarity
            )
            combined = combined | "OneNeighbourLists" >> beam.Map(lambda n: [n])
        else:
            final = found | "Neighbours" >> beam.FlatMap(_neighbours, self.embedder, self.similarity)
        neighbours = (final, combined) | "AllNeighbours" >> beam.Flatten()
        return {"edges": edges, "neighbours": neighbours}


def _columnar(batch) -> tuple:
    keys, vecs = batch
    v = np.asarray(vecs, dtype=np.float16)
    return np.asarray(list(keys), dtype=str), v.reshape(len(v), 1, -1)


class VectorEdges(beam.PTransform):
    """(keys, vectors) batches -> {"edges": Edge, "neighbours": Neighbour}: cosine >= threshold."""

    def __init__(self, threshold: float, embedder: str, cluster_cfg, seed: int, batched_neighbours: bool = False):
        super().__init__()
        self.threshold, self.embedder, self.cluster_cfg, self.seed = threshold, embedder, cluster_cfg, seed
        self.batched_neighbours = batched_neighbours

    def expand(self, batches):
        search = CellSearch(
            self.threshold, self.embedder, self.cluster_cfg, self.seed, batched_neighbours=self.batched_neighbours
        )
        return batches | "Columnar" >> beam.Map(_columnar) | "CellSearch" >> search
