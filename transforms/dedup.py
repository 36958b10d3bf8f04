"""Duplicate clusters: edges from every embedder -> connected components -> one keeper each.

Embedders only annotate (they emit ``Edge`` elements). This stage unions the edges of all of
them (exact bytes, exact pixels, perceptual hash, CLIP), so a chain a~b~c is one cluster
(SemDeDup's greedy order lets such chains slip), and picks the keeper by the configured policy
with deterministic tie-breaks. Nothing is gathered: components are large-star/small-star rounds
over keyed edges (``transforms.components``), and each cluster's members and edges meet in one
``CoGroupByKey`` on the cluster id, where the keeper is chosen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

import apache_beam as beam

from schemas.elements import ClusterAssignment, Edge, SampleInfo
from transforms.components import DEFAULT_ROUNDS, Components

EMBEDDER_RANK = {"exact": 0, "pixels": 1, "phash": 2, "clip": 3, "previous": 4}


def exact_edges(group: tuple[str, Iterable[str]], embedder: str) -> Iterator[Edge]:
    """All keys sharing one digest -> a star of edges to the smallest key."""
    _, keys = group
    ordered = sorted(set(keys))
    for other in ordered[1:]:
        yield Edge(ordered[0], other, 1.0, embedder)


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
    """Pick the keeper and describe each member's link to it (the edges are read once, streaming)."""
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


def _pair(e: Edge) -> tuple[str, str]:
    return (e.key_a, e.key_b) if e.key_a < e.key_b else (e.key_b, e.key_a)


def _member(item) -> Iterator[tuple[str, SampleInfo]]:
    """(key, {"info", "root"}) -> (root, info) for a key in a cluster."""
    _, grouped = item
    infos = sorted(grouped["info"], key=lambda i: i.shard)  # a key repeated across shards: first shard wins
    roots = list(grouped["root"])
    if infos and roots:
        yield roots[0], infos[0]


def _single(item) -> Iterator[ClusterAssignment]:
    """(key, {"info", "root"}) -> a cluster of one for a key with no edge."""
    key, grouped = item
    if not list(grouped["root"]) and list(grouped["info"]):
        yield ClusterAssignment(key, key, 1, True, "", 1.0)


def _edge_to_cluster(item) -> Iterator[tuple[str, Edge]]:
    _, grouped = item
    roots = list(grouped["root"])
    if roots:
        for e in grouped["edge"]:
            yield roots[0], e


def _assign(item, policy: str) -> Iterator[ClusterAssignment]:
    cluster_id, grouped = item
    members = list(grouped["member"])
    if members:
        yield from assign_cluster(cluster_id, members, grouped["edge"], policy)


def _old_end(item, end: str) -> Iterator[tuple[str, tuple[Edge, bool]]]:
    """Incremental join: tag each edge with whether its ``end`` key is an old sample."""
    _, grouped = item
    old = bool(list(grouped["old"]))
    for e, a_old in grouped["edge"]:
        yield (e.key_b, (e, old)) if end == "a" else (None, (e, a_old and old))


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
        by_a = {"edge": fresh | "ByA" >> beam.Map(lambda e: (e.key_a, (e, False))), "old": old}
        tagged = by_a | "JoinA" >> beam.CoGroupByKey() | "TagA" >> beam.FlatMap(_old_end, end="a")
        by_b = {"edge": tagged, "old": old} | "JoinB" >> beam.CoGroupByKey()
        kept = (
            by_b
            | "TagB" >> beam.FlatMap(_old_end, end="b")
            | "NotBothOld" >> beam.FlatMap(lambda kv: [] if kv[1][1] else [kv[1][0]])
        )
        return (previous, kept) | "NewPairs" >> beam.Flatten()


class FindDuplicates(beam.PTransform):
    """{"infos": SampleInfo, "edges": PCollection[Edge] (optional)} -> {"assignments", "edges"}.

    Exact-byte and exact-pixel edges are computed here; other embedders pass their edges in.
    Every info gets an assignment: singletons form a cluster of size 1 under their own key.
    ``old_keys`` (incremental mode): the old samples' keys, a PCollection or a collection.
    """

    def __init__(
        self,
        keeper: str,
        exact: bool = True,
        exact_pixels: bool = True,
        old_keys=None,
        rounds: int = DEFAULT_ROUNDS,
    ):
        super().__init__()
        self.keeper = keeper
        self.exact = exact
        self.exact_pixels = exact_pixels
        self.old_keys = old_keys  # incremental mode: old-old pairs come from the old clusters
        self.rounds = rounds

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
        if self.old_keys is not None and (isinstance(self.old_keys, beam.pvalue.PCollection) or self.old_keys):
            edges = edges | "OnlyNewPairs" >> _OnlyNewPairs(self.old_keys)
        roots = edges | "Pairs" >> beam.Map(_pair) | "Components" >> Components(self.rounds)
        keyed_infos = infos | "KeyInfos" >> beam.Map(lambda i: (i.key, i))
        joined = {"info": keyed_infos, "root": roots} | "JoinComponents" >> beam.CoGroupByKey()
        members = joined | "MemberOf" >> beam.FlatMap(_member)
        singles = joined | "Singletons" >> beam.FlatMap(_single)
        cluster_edges = (
            {"edge": edges | "EdgesByA" >> beam.Map(lambda e: (e.key_a, e)), "root": roots}
            | "JoinEdgeRoots" >> beam.CoGroupByKey()
            | "EdgeOfCluster" >> beam.FlatMap(_edge_to_cluster)
        )
        clustered = (
            {"member": members, "edge": cluster_edges}
            | "GroupClusters" >> beam.CoGroupByKey()
            | "Assign" >> beam.FlatMap(_assign, policy=self.keeper)
        )
        from pipeline import progress

        assignments = (clustered, singles) | "AllAssignments" >> beam.Flatten() | "Progress" >> progress.Tick("dedup")
        return {"assignments": assignments, "edges": edges}
