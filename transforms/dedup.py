"""Duplicate clusters: edges from every embedder -> connected components -> one keeper each.

Embedders only annotate (they emit ``Edge`` elements). This stage unions the edges of all of
them (exact bytes, exact pixels, perceptual hash, CLIP), so a chain a~b~c is one cluster
(SemDeDup's greedy order lets such chains slip), and picks the keeper by the configured policy
with deterministic tie-breaks. Nothing is gathered: components are large-star/small-star rounds
over per-bucket edge lists (``transforms.components``); the roots come out as lists per key-hash
bucket, joined there with the members' ranking features and with the edges (lists per bucket of
``key_a``); members and edges then travel as lists per hash bucket of their cluster id, where one
``CoGroupByKey`` brings each cluster together and the keeper is chosen, cluster by cluster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

import apache_beam as beam

from schemas.elements import ClusterAssignment, Edge, SampleInfo
from transforms.components import BATCH, DEFAULT_ROUNDS, Components
from transforms.key_batches import BufferedBuckets, grouped, split_buckets

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
            ClusterAssignment(
                info.key, cluster_id, len(members), info.key == keeper, embedder, float(similarity), info.shard
            )
        )
    return out


def _pair(e: Edge) -> tuple[str, str]:
    return (e.key_a, e.key_b) if e.key_a < e.key_b else (e.key_b, e.key_a)


def _digest_lists(table, field: str, n: int) -> Iterator[tuple[int, list]]:
    """An info batch -> (bucket, [(digest, key)]) per bucket; an empty digest (no image bytes,
    e.g. precomputed embeddings) links nothing."""
    pairs = zip(table.column(field).to_pylist(), table.column("key").to_pylist(), strict=True)
    yield from split_buckets(((d, k) for d, k in pairs if d), n)


def _digest_edges(item, embedder: str) -> Iterator[Edge]:
    """(bucket, lists of (digest, key)) -> a star of edges per digest shared by 2+ keys."""
    _, lists = item
    for digest, keys in sorted(grouped(lists).items()):
        if len(keys) > 1:
            yield from exact_edges((digest, keys), embedder)


RANK_FIELDS = ("key", "shard", "width", "height", "original_width", "original_height", "image_bytes")


def _feature_lists(table, n: int, with_meta: bool) -> Iterator[tuple[int, list]]:
    """An info batch -> (bucket, [(key, ranking features)]): what the keeper needs of a member."""
    cols = [table.column(c).to_pylist() for c in RANK_FIELDS]
    metas = table.column("meta_json").to_pylist() if with_meta else None
    rows = []
    for i, values in enumerate(zip(*cols, strict=True)):
        rows.append((values[0], (*values[1:], metas[i] if metas else "{}")))
    yield from split_buckets(rows, n)


def _member(item, n: int) -> Iterator[tuple[int, list]]:
    """(bucket, {"root": [(keys, roots)], "features": lists}) -> (bucket of the root, [(root,
    member)]) for the clustered keys; a key repeated across shards: its first shard's record."""
    _, joined = item
    roots = {k: r for keys, rts in joined["root"] for k, r in zip(keys, rts, strict=True)}
    if not roots:
        return
    found: dict[str, tuple] = {}
    for pairs in joined["features"]:
        for key, f in pairs:
            if key in roots and (key not in found or f[0] < found[key][0]):
                found[key] = f
    members = (
        (roots[key], SampleInfo(key, shard, "", "", "", "", w, h, meta, ow, oh, n_bytes))
        for key, (shard, w, h, ow, oh, n_bytes, meta) in sorted(found.items())
    )
    yield from split_buckets(members, n)


def _by_key_a(e: Edge) -> Iterator[tuple[str, Edge]]:
    yield e.key_a, e


def _edges_to_clusters(item, n: int) -> Iterator[tuple[int, list]]:
    """(bucket, {"root": [(keys, roots)], "edge": [[edges]]}) -> (bucket of the root, [(root, edge)])."""
    _, joined = item
    roots = {k: r for keys, rts in joined["root"] for k, r in zip(keys, rts, strict=True)}
    yield from split_buckets(((roots[e.key_a], e) for edges in joined["edge"] for e in edges), n)


def _assign(item, policy: str) -> Iterator[ClusterAssignment]:
    """(bucket, {"member": lists of (root, member), "edge": lists of (root, edge)}) -> every
    member's assignment, cluster by cluster."""
    _, joined = item
    members, edges = grouped(joined["member"]), grouped(joined["edge"])
    for cluster_id in sorted(members):
        yield from assign_cluster(cluster_id, members[cluster_id], edges.get(cluster_id, ()), policy)


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
    """{"info_batches": SampleInfo tables, "edges": PCollection[Edge] (optional)} ->
    {"assignments", "edges"}.

    Exact-byte and exact-pixel edges are computed here (digests shuffled as lists per hash
    bucket); other embedders pass their edges in. Only clustered keys get an assignment (with
    their shard): a key without one is a cluster of one under its own key. The keeper's ranking
    features of the clustered keys are joined per key-hash bucket, so no element per sample
    travels. ``old_keys`` (incremental mode): the old samples' keys, a PCollection or a collection.
    """

    def __init__(
        self,
        keeper: str,
        exact: bool = True,
        exact_pixels: bool = True,
        old_keys=None,
        rounds: int = DEFAULT_ROUNDS,
        buckets: int = 16,
    ):
        super().__init__()
        self.keeper = keeper
        self.exact = exact
        self.exact_pixels = exact_pixels
        self.old_keys = old_keys  # incremental mode: old-old pairs come from the old clusters
        self.rounds = rounds
        self.buckets = buckets

    def expand(self, inputs):
        batches = inputs["info_batches"]
        n = self.buckets
        edge_sets = [inputs["edges"]] if "edges" in inputs else []
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
        edges = edges | "NoSelfEdges" >> beam.Filter(lambda e: e.key_a != e.key_b)
        if self.old_keys is not None and (isinstance(self.old_keys, beam.pvalue.PCollection) or self.old_keys):
            edges = edges | "OnlyNewPairs" >> _OnlyNewPairs(self.old_keys)
        root_lists = edges | "Pairs" >> beam.Map(_pair) | "Components" >> Components(self.rounds, n, batched=True)
        with_meta = self.keeper.startswith("column:")
        members = {
            "root": root_lists,  # (bucket_of(key, n), (keys, roots)): already in the features' buckets
            "features": batches | "FeatureBuckets" >> beam.FlatMap(_feature_lists, n=n, with_meta=with_meta),
        } | "JoinComponents" >> beam.CoGroupByKey()
        cluster_edges = (
            {"edge": edges | "EdgeBuckets" >> beam.ParDo(BufferedBuckets(n, _by_key_a, BATCH)), "root": root_lists}
            | "JoinEdgeRoots" >> beam.CoGroupByKey()
            | "EdgeOfCluster" >> beam.FlatMap(_edges_to_clusters, n=n)
        )
        clustered = (
            {"member": members | "MemberOf" >> beam.FlatMap(_member, n=n), "edge": cluster_edges}
            | "GroupClusters" >> beam.CoGroupByKey()
            | "Assign" >> beam.FlatMap(_assign, policy=self.keeper)
        )
        from pipeline import progress

        assignments = clustered | "Progress" >> progress.Tick("dedup")
        return {"assignments": assignments, "edges": edges}
