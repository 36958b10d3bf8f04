"""Duplicate clusters: edges from every embedder -> connected components -> one keeper each.

Embedders only annotate (they emit ``Edge`` elements). This stage unions the edges of all of
them (exact bytes, exact pixels, perceptual hash, CLIP), so a chain a~b~c is one cluster
(SemDeDup's greedy order lets such chains slip), and picks the keeper by the configured policy
with deterministic tie-breaks. Only keys that have an edge are shuffled to the global step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

import apache_beam as beam

from schemas.elements import ClusterAssignment, Edge, SampleInfo

EMBEDDER_RANK = {"exact": 0, "pixels": 1, "phash": 2, "clip": 3, "previous": 4}


def exact_edges(group: tuple[str, Iterable[str]], embedder: str) -> Iterator[Edge]:
    """All keys sharing one digest -> a star of edges to the smallest key."""
    _, keys = group
    ordered = sorted(set(keys))
    for other in ordered[1:]:
        yield Edge(ordered[0], other, 1.0, embedder)


def components(edges: list[Edge]) -> dict[str, str]:
    """key -> component id (the smallest key in the component), for keys with an edge."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = sorted({e.key_a for e in edges} | {e.key_b for e in edges})
    if not keys:
        return {}
    index = {k: i for i, k in enumerate(keys)}
    rows = np.fromiter((index[e.key_a] for e in edges), dtype=np.int64, count=len(edges))
    cols = np.fromiter((index[e.key_b] for e in edges), dtype=np.int64, count=len(edges))
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (rows, cols)), shape=(len(keys), len(keys)))
    _, labels = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for key, label in zip(keys, labels, strict=True):  # keys are sorted, so the first seen is the smallest
        first.setdefault(int(label), key)
    return {key: first[int(label)] for key, label in zip(keys, labels, strict=True)}


def _column_value(info: SampleInfo, column: str) -> float:
    try:
        value = json.loads(info.meta_json or "{}").get(column)
        return float(value)
    except (TypeError, ValueError):
        return -math.inf


def keeper_sort_key(policy: str):
    """A sort key: the first member after sorting is the keeper. Ties -> the smallest key."""
    if policy in ("resolution", "centre"):  # centre needs vectors: the float path handles it
        return lambda i: (-(i.width * i.height), i.key)
    if policy == "earliest":
        return lambda i: (i.key,)
    if policy.startswith("column:"):
        parts = policy.split(":")
        column, order = parts[1], (parts[2] if len(parts) > 2 else "desc")
        sign = -1.0 if order == "desc" else 1.0
        return lambda i: (sign * _column_value(i, column), i.key)
    raise ValueError(f"dedup.keeper: unknown policy {policy!r}")


def assign_cluster(
    cluster_id: str, members: list[SampleInfo], edges: list[Edge], policy: str
) -> list[ClusterAssignment]:
    """Pick the keeper and describe each member's link to it."""
    ordered = sorted(members, key=keeper_sort_key(policy))
    keeper = ordered[0].key
    best: dict[str, tuple[int, float, str]] = {}
    direct: dict[str, float] = {}
    for e in edges:
        for a, b in ((e.key_a, e.key_b), (e.key_b, e.key_a)):
            rank = EMBEDDER_RANK.get(e.embedder, 9)
            current = best.get(a)
            if current is None or (rank, -e.similarity) < (current[0], -current[1]):
                best[a] = (rank, e.similarity, e.embedder)
            if b == keeper:
                direct[a] = max(direct.get(a, -1.0), e.similarity)
    out = []
    for info in ordered:
        rank, sim, embedder = best.get(info.key, (9, 1.0, ""))
        similarity = 1.0 if info.key == keeper else direct.get(info.key, sim)
        out.append(
            ClusterAssignment(info.key, cluster_id, len(members), info.key == keeper, embedder, float(similarity))
        )
    return out


def _gather_components(edges: list[Edge]) -> Iterator[tuple[str, str]]:
    yield from components(edges).items()


def _assign(item, edges_by_cluster: dict, policy: str) -> Iterator[ClusterAssignment]:
    cluster_id, members = item
    yield from assign_cluster(cluster_id, list(members), edges_by_cluster.get(cluster_id, []), policy)


def _edges_by_cluster(edges: list[Edge], comp: dict[str, str]) -> dict[str, list[Edge]]:
    out: dict[str, list[Edge]] = {}
    for e in edges:
        out.setdefault(comp[e.key_a], []).append(e)
    return out


def _join_member(item) -> Iterator[tuple[str, SampleInfo]]:
    _, grouped = item
    infos, comps = sorted(grouped["info"], key=lambda i: i.shard), list(grouped["comp"])
    if infos and comps:  # a key repeated across shards: the first shard's record wins
        yield comps[0], infos[0]


class FindDuplicates(beam.PTransform):
    """{"infos": SampleInfo, "edges": PCollection[Edge] (optional)} -> {"assignments", "edges"}.

    Exact-byte and exact-pixel edges are computed here; other embedders pass their edges in.
    Every info gets an assignment: singletons form a cluster of size 1 under their own key.
    """

    def __init__(self, keeper: str, exact: bool = True, exact_pixels: bool = True, old_keys: set | None = None):
        super().__init__()
        self.keeper = keeper
        self.exact = exact
        self.exact_pixels = exact_pixels
        self.old_keys = frozenset(old_keys or ())  # incremental mode: old-old pairs come from the old clusters

    def expand(self, inputs):
        infos = inputs["infos"]
        edge_sets = [inputs["edges"]] if "edges" in inputs else []
        if self.exact:
            digests = [("exact", "sha256")] + ([("pixels", "pixel_sha256")] if self.exact_pixels else [])
            for name, field in digests:
                edge_sets.append(
                    infos
                    # an empty digest (no image bytes, e.g. precomputed embeddings) links nothing
                    | f"By{name}" >> beam.FlatMap(lambda i, f=field: [(getattr(i, f), i.key)] if getattr(i, f) else [])
                    | f"Group{name}" >> beam.GroupByKey()
                    | f"Edges{name}" >> beam.FlatMap(exact_edges, embedder=name)
                )
        edges = (
            tuple(edge_sets) | "AllEdges" >> beam.Flatten()
            if edge_sets
            else infos.pipeline | "NoEdges" >> beam.Create([])
        )
        edges = edges | "NoSelfEdges" >> beam.Filter(lambda e: e.key_a != e.key_b)
        if self.old_keys:
            from transforms.incremental import touches_new

            edges = edges | "OnlyNewPairs" >> beam.Filter(touches_new, old_keys=self.old_keys)
        edge_list = edges | "EdgeList" >> beam.combiners.ToList()
        comp = edge_list | "Components" >> beam.FlatMap(_gather_components)
        by_cluster = edge_list | "EdgesByCluster" >> beam.Map(
            lambda es, c: _edges_by_cluster(es, dict(c)), c=beam.pvalue.AsList(comp)
        )
        keyed_infos = infos | "KeyInfos" >> beam.Map(lambda i: (i.key, i))
        joined = {"info": keyed_infos, "comp": comp} | "JoinComponents" >> beam.CoGroupByKey()
        clustered = (
            joined
            | "MemberOf" >> beam.FlatMap(_join_member)
            | "GroupClusters" >> beam.GroupByKey()
            | "Assign"
            >> beam.FlatMap(_assign, edges_by_cluster=beam.pvalue.AsSingleton(by_cluster), policy=self.keeper)
        )
        singles = joined | "Singletons" >> beam.FlatMap(
            lambda kv: (
                [ClusterAssignment(kv[0], kv[0], 1, True, "", 1.0)]
                if list(kv[1]["info"]) and not list(kv[1]["comp"])
                else []
            )
        )
        assignments = (clustered, singles) | "AllAssignments" >> beam.Flatten()
        return {"assignments": assignments, "edges": edges}
