"""Duplicate clusters: edges from every embedder -> connected components -> one keeper each.

Embedders only annotate (they emit ``Edge`` elements, or ``EdgeBatch`` columns). This stage
unions the edges of all of them (exact bytes, exact pixels, perceptual hash, CLIP), so a chain
a~b~c is one cluster (SemDeDup's greedy order lets such chains slip), and picks the keeper by the
configured policy with deterministic tie-breaks. Nothing is gathered and nothing is one element
per sample: edges travel as arrays, components are large-star/small-star rounds over per-bucket
arrays of 64-bit key ids (``transforms.components``); the roots come out per id bucket, joined
there in one ``CoGroupByKey`` with the members' ranking features (Arrow columns of every info
batch, filtered to the clustered ids) and with the edges; members and edges then travel per
bucket of their root, where one ``GroupByKey`` brings each cluster together and the keepers are
chosen, vectorised (``transforms.cluster_columns``). The assignments leave as one Arrow table per
root bucket (no element per clustered key unless ``per_key``). The cluster id is the
component's smallest key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import ClusterAssignment, Edge, EdgeBatch, SampleInfo
from transforms.assignment_tables import assignment_elements
from transforms.cluster_columns import (
    EMBEDDER_RANK,
    EdgeColumns,
    assign_tables,
    edge_batch,
    feature_tables,
    id_columns,
    id_pairs,
    labelled,
    single_edges,
    split_by,
)
from transforms.components import Components
from transforms.key_batches import key_ids


def _column_value(info: SampleInfo, column: str) -> float:
    try:
        value = json.loads(info.meta_json or "{}").get(column)
        return float(value)
    except (TypeError, ValueError):
        return -math.inf


def keeper_sort_key(policy: str):
    """A sort key: the first member after sorting is the keeper. Ties -> the smallest key.

    ``resolution`` (and ``centre``, whose vector path is elsewhere) ranks by the original pixel
    count img2dataset recorded before resizing (decoded pixels when unknown), then the decoded
    pixels, then encoded bytes per pixel (the less compressed copy first), then the key: a
    degraded copy resized to the same 256 px as its original no longer ties with it.
    """
    if policy in ("resolution", "centre"):
        return _resolution_rank
    if policy == "earliest":
        return lambda i: (i.key,)
    if policy.startswith("column:"):
        parts = policy.split(":")
        if len(parts) not in (2, 3) or not parts[1] or (len(parts) == 3 and parts[2] not in ("asc", "desc")):
            raise ValueError(f"dedup.keeper: {policy!r} is not column:NAME[:asc|desc]")
        column, order = parts[1], (parts[2] if len(parts) > 2 else "desc")
        sign = -1.0 if order == "desc" else 1.0

        def rank(i: SampleInfo) -> tuple:
            value = _column_value(i, column)
            missing = not math.isfinite(value)  # a member without the column (or NaN) ranks last
            return (missing, 0.0 if missing else sign * value, i.key)

        return rank
    raise ValueError(f"dedup.keeper: unknown policy {policy!r}")


def _resolution_rank(info: SampleInfo) -> tuple:
    decoded = max(int(info.width or 0), 0) * max(int(info.height or 0), 0)
    ow, oh = int(getattr(info, "original_width", 0) or 0), int(getattr(info, "original_height", 0) or 0)
    original = ow * oh if ow > 0 and oh > 0 else decoded
    n_bytes = int(getattr(info, "image_bytes", 0) or 0)
    per_pixel = n_bytes / decoded if decoded else 0.0
    return (-original, -decoded, -per_pixel, info.key)


def assign_cluster(
    cluster_id: str, members: list[SampleInfo], edges: Iterable[Edge], policy: str
) -> list[ClusterAssignment]:
    """Pick the keeper and describe each member's link to it, one cluster as objects (the
    reference that ``cluster_columns.assign_clusters`` vectorises; tests compare the two)."""
    ordered = sorted(members, key=keeper_sort_key(policy))
    keeper = ordered[0].key
    best: dict[str, tuple[int, float, str]] = {}
    direct: dict[str, float] = {}
    for e in edges:
        for a, b in ((e.key_a, e.key_b), (e.key_b, e.key_a)):
            rank = EMBEDDER_RANK.get(e.embedder, 9)
            current = best.get(a)
            if current is None or (rank, -e.similarity, e.embedder) < (current[0], -current[1], current[2]):
                best[a] = (rank, e.similarity, e.embedder)
            if b == keeper:
                direct[a] = max(direct.get(a, -1.0), e.similarity)
    out = []
    for info in ordered:
        rank, sim, embedder = best.get(info.key, (9, 1.0, ""))
        similarity = 1.0 if info.key == keeper else direct.get(info.key, sim)
        out.append(
            ClusterAssignment(
                info.key, cluster_id, len(members), info.key == keeper, embedder, float(similarity), info.shard
            )
        )
    return out


def _digest_lists(table, field: str, n: int) -> Iterator[tuple[int, tuple]]:
    """An info batch -> (bucket of the digest, (digest ids, digests, keys)) per bucket; an empty
    digest (no image bytes, e.g. precomputed embeddings) links nothing."""
    import pyarrow.compute as pc

    col = table.column(field)
    has = pc.fill_null(pc.not_equal(col, ""), False)
    if not table.num_rows or not pc.any(has).as_py():
        return
    digests = col.filter(has)
    keys = table.column("key").filter(has)
    cols = (key_ids(digests), _numpy(digests), _numpy(keys))
    yield from split_by(cols, 0, n)


def _numpy(column) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(object)


def _digest_edges(item, embedder: str) -> Iterator[EdgeBatch]:
    """(bucket, lists of (digest ids, digests, keys)) -> a star of edges to the smallest key per
    digest shared by 2+ keys (one EdgeBatch); only digests whose id repeats leave numpy."""
    _, lists = item
    lists = [c for c in lists if len(c[0])]
    if not lists:
        return
    ids, digests, keys = (np.concatenate([c[i] for c in lists]) for i in range(3))
    uniq, counts = np.unique(ids, return_counts=True)
    shared = np.isin(ids, uniq[counts > 1])
    by_digest: dict[str, set] = {}
    for d, k in zip(digests[shared].tolist(), keys[shared].tolist(), strict=True):
        by_digest.setdefault(d, set()).add(k)
    lo: list[str] = []
    hi: list[str] = []
    for digest in sorted(by_digest):
        ordered = sorted(by_digest[digest])
        lo.extend([ordered[0]] * (len(ordered) - 1))
        hi.extend(ordered[1:])
    batch = edge_batch(lo, hi, np.ones(len(lo)), embedder) if lo else None
    if batch is not None:
        yield batch


def _tag_old_a(item) -> Iterator[tuple[str, tuple[Edge, bool]]]:
    """Incremental join on key_a: -> (key_b, (edge, key_a is old))."""
    _, grouped = item
    a_old = bool(list(grouped["old"]))
    for e in grouped["edge"]:
        yield e.key_b, (e, a_old)


def _unless_both_old(item) -> Iterator[Edge]:
    """Incremental join on key_b: keep the edges that touch a new sample."""
    _, grouped = item
    b_old = bool(list(grouped["old"]))
    for e, a_old in grouped["edge"]:
        if not (a_old and b_old):
            yield e


class _OnlyNewPairs(beam.PTransform):
    """Drop edges between two old samples (their pair is in the old clusters): two keyed joins
    against the old keys instead of a set of every old key in each worker."""

    def __init__(self, old_keys):
        super().__init__()
        self.old_keys = old_keys

    def expand(self, edges):
        from transforms.incremental import PREVIOUS

        old = self.old_keys
        if not isinstance(old, beam.pvalue.PCollection):
            old = edges.pipeline | "OldKeys" >> beam.Create(sorted(old))
        old = old | "OldKeyed" >> beam.Map(lambda k: (k, True))
        previous = edges | "Previous" >> beam.Filter(lambda e: e.embedder == PREVIOUS)
        fresh = edges | "Fresh" >> beam.Filter(lambda e: e.embedder != PREVIOUS)
        by_a = {"edge": fresh | "ByA" >> beam.Map(lambda e: (e.key_a, e)), "old": old}
        tagged = by_a | "JoinA" >> beam.CoGroupByKey() | "TagA" >> beam.FlatMap(_tag_old_a)
        by_b = {"edge": tagged, "old": old} | "JoinB" >> beam.CoGroupByKey()
        kept = by_b | "NotBothOld" >> beam.FlatMap(_unless_both_old)
        return (previous, kept) | "NewPairs" >> beam.Flatten()


class FindDuplicates(beam.PTransform):
    """{"info_batches": SampleInfo tables, "edges": PCollection of ``Edge`` and/or ``EdgeBatch``
    (optional)} -> {"assignment_tables": the clustered keys' assignments as Arrow tables (one per
    cluster bucket, ``cluster_columns.ASSIGNMENT_SCHEMA``: what ``pipeline.graph`` routes to
    shards and writes), "edges": normalised EdgeBatch, and with ``per_key`` (the default)
    "assignments": one ClusterAssignment per clustered key}.

    Exact-byte and exact-pixel edges are computed here (digests shuffled as arrays per hash
    bucket); other embedders pass their edges in, one at a time or as batches. The components run
    on 64-bit ids of the keys (``transforms.cluster_columns``). Only clustered keys get an
    assignment (with their shard): a key without one is a cluster of one under its own key. The
    ranking features join the labels as Arrow columns per id bucket, and only the clustered rows
    go on. ``old_keys`` (incremental mode): the old samples' keys, a PCollection or a collection.
    """

    def __init__(
        self,
        keeper: str,
        exact: bool = True,
        exact_pixels: bool = True,
        old_keys=None,
        rounds: int | None = None,  # local-star rounds; None: components.rounds_for(buckets)
        buckets: int = 16,
        per_key: bool = True,
    ):
        super().__init__()
        self.keeper = keeper
        self.exact = exact
        self.exact_pixels = exact_pixels
        self.old_keys = old_keys  # incremental mode: old-old pairs come from the old clusters
        self.rounds = rounds
        self.buckets = buckets
        self.per_key = per_key  # also one ClusterAssignment element per clustered key

    def expand(self, inputs):
        batches = inputs["info_batches"]
        n = self.buckets
        edge_sets = [inputs["edges"] | "EdgeColumns" >> beam.ParDo(EdgeColumns())] if "edges" in inputs else []
        if self.exact:
            digests = [("exact", "sha256")] + ([("pixels", "pixel_sha256")] if self.exact_pixels else [])
            for name, field in digests:
                edge_sets.append(
                    batches
                    | f"By{name}" >> beam.FlatMap(_digest_lists, field=field, n=n)
                    | f"Group{name}" >> beam.GroupByKey()
                    | f"Edges{name}" >> beam.FlatMap(_digest_edges, embedder=name)
                )
        edges = (
            tuple(edge_sets) | "AllEdges" >> beam.Flatten()
            if edge_sets
            else batches.pipeline | "NoEdges" >> beam.Create([])
        )
        if self.old_keys is not None and (isinstance(self.old_keys, beam.pvalue.PCollection) or self.old_keys):
            edges = (
                edges
                | "SingleEdges" >> beam.FlatMap(single_edges)
                | "OnlyNewPairs" >> _OnlyNewPairs(self.old_keys)
                | "NewEdgeColumns" >> beam.ParDo(EdgeColumns())
            )
        cols = edges | "EdgeIds" >> beam.Map(id_columns)
        root_lists = (
            cols | "Pairs" >> beam.Map(id_pairs) | "Components" >> Components(self.rounds, n, ids=True)
        )  # (id mod n, (ids, root ids))
        with_meta = self.keeper.startswith("column:")
        tables = (
            {
                "root": root_lists,
                "features": batches | "FeatureBuckets" >> beam.FlatMap(feature_tables, n=n, with_meta=with_meta),
                "edge": cols | "EdgeBuckets" >> beam.FlatMap(split_by, column=0, n=n),
            }
            | "JoinLabels" >> beam.CoGroupByKey()
            | "Labelled" >> beam.FlatMap(labelled, n=n)  # (root bucket, members or edges)
            | "GroupClusters" >> beam.GroupByKey()
            | "Assign" >> beam.FlatMap(assign_tables, policy=self.keeper)
        )
        out = {"assignment_tables": tables, "edges": edges}
        if self.per_key:
            out["assignments"] = tables | "Assignments" >> beam.FlatMap(assignment_elements)
        return out
