"""Distributed connected components and FindDuplicates on Beam, against scipy on the same edges."""

import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.elements import ClusterAssignment, Edge, SampleInfo
from transforms.components import (
    Components,
    NotConverged,
    edge_lists,
    id_edge_lists,
    large_star,
    local_star,
    rounds_for,
    small_star,
    star_labels,
)
from transforms.dedup import FindDuplicates


def _scipy_labels(edges):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = sorted({k for e in edges for k in e})
    index = {k: i for i, k in enumerate(keys)}
    rows = [index[a] for a, _ in edges]
    cols = [index[b] for _, b in edges]
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(keys), len(keys)))
    _, labels = connected_components(graph, directed=False)
    first = {}
    for k, lab in zip(keys, labels, strict=True):
        first.setdefault(lab, k)
    return {k: first[lab] for k, lab in zip(keys, labels, strict=True)}


def _group(items):
    out = {}
    for b, (src, dst) in items:
        half = len(src) // 2
        out.setdefault(b, []).extend([(src[:half], dst[:half]), (src[half:], dst[half:])])
    return sorted(out.items())


def _run_rounds(edges, rounds, n=4, local=False):
    """The same batched round functions as the Beam transform, run as plain Python (buckets
    grouped by a dict; each list split in two to stand for lists from several batches):
    ``local`` rounds (``local_star``, the transform's) or large-star / small-star pairs."""

    group = _group
    batcher = edge_lists(n)
    batcher.start_bundle()
    lists = [kv for e in edges for kv in batcher.process(e)] + list(batcher._flush())
    for _ in range(rounds):
        if local:
            lists = [kv for item in group(lists) for kv in local_star(item, n)]
            continue
        large = [kv for item in group(lists) for kv in large_star(item, n)]
        lists = [kv for item in group(large) for kv in small_star(item, n)]
    out = {}
    for item in group(lists):
        for _, (nodes, roots) in star_labels(item, rounds):
            out.update(zip(nodes, roots, strict=True))
    return out


def _graph(seed: int, n: int, m: int):
    rng = random.Random(seed)
    names = [f"k{i:05d}" for i in range(n)]
    edges = set()
    while len(edges) < m:
        a, b = rng.sample(names, 2)
        edges.add((min(a, b), max(a, b)))
    return sorted(edges)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("local", [False, True])
def test_rounds_match_scipy_on_random_graphs(seed, local):
    edges = _graph(seed, 3000, 2500)
    assert _run_rounds(edges, 12, local=local) == _scipy_labels(edges)


@pytest.mark.parametrize("local", [False, True])
def test_long_path_in_shuffled_key_order(local):
    rng = random.Random(5)
    names = [f"n{i:05d}" for i in range(1000)]
    rng.shuffle(names)
    edges = [tuple(sorted(p)) for p in zip(names, names[1:], strict=False)]
    labels = _run_rounds(edges, 12, local=local)
    assert set(labels.values()) == {min(names)} and len(labels) == 1000


@pytest.mark.parametrize("local", [False, True])
def test_too_few_rounds_fail_loudly(local):
    names = [f"n{i:04d}" for i in range(200)]
    edges = list(zip(names, names[1:], strict=False))
    with pytest.raises(NotConverged, match="did not converge in 1 rounds.*FindDuplicates\\(rounds="):
        _run_rounds(edges, 1, n=16, local=local)


def _id_rounds(lo, hi, n, rounds):
    """Local-star rounds on int64 ids as FindDuplicates runs them -> ({id: root id}, rounds it took
    to converge, None past ``rounds``)."""
    lists = list(id_edge_lists((lo, hi), n))
    for r in range(1, rounds + 1):
        lists = [kv for item in _group(lists) for kv in local_star(item, n)]
        try:
            out = {}
            for item in _group(lists):
                for _, (nodes, roots) in star_labels(item, r):
                    out.update(zip(nodes.tolist(), roots.tolist(), strict=True))
            return out, r
        except NotConverged:
            continue
    return None, None


@pytest.mark.parametrize("buckets, most", [(1, 1), (2, 2), (16, 8), (256, 14)])
def test_local_rounds_on_a_shuffled_path(buckets, most):
    """A path of 20,000 random ids: one round is union-find in one bucket; more buckets need more
    rounds, all within ``rounds_for``; every id's root is the smallest id."""
    ids = np.random.default_rng(buckets).choice(1 << 40, 20_000, replace=False).astype(np.int64)
    lo, hi = np.minimum(ids[:-1], ids[1:]), np.maximum(ids[:-1], ids[1:])
    labels, took = _id_rounds(lo, hi, buckets, rounds_for(buckets))
    assert took is not None and took <= most <= rounds_for(buckets)
    assert labels == dict.fromkeys(ids.tolist(), int(ids.min()))


def test_rounds_for_the_buckets():
    assert [rounds_for(b) for b in (1, 2, 3, 16, 256, 4096)] == [4, 6, 8, 12, 16, 16]
    assert Components(buckets=2).rounds == 6 and Components(rounds=3, buckets=2).rounds == 3


@pytest.mark.parametrize("rounds", [12, None])
def test_components_transform_on_pipeline(rounds):
    edges = _graph(7, 400, 300)
    truth = _scipy_labels(edges)
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(edges) | Components(rounds=rounds, buckets=5)
        assert_that(out, equal_to(sorted(truth.items())))


def _info(key, w=100, shard="s0"):
    return SampleInfo(key, shard, "", "", f"sha-{key}", f"px-{key}", w, w)


def _batches(infos):
    """SampleInfo objects -> info batches, one per shard (a batch never spans shards)."""
    from schemas.arrow import info_table

    shards = sorted({i.shard for i in infos})
    return [info_table([i for i in infos if i.shard == s]) for s in shards]


def test_find_duplicates_chain_keeper_and_singletons():
    infos = [_info("a", 50), _info("b", 200), _info("c", 100), _info("d"), _info("b", 10, shard="s1")]
    edges = [Edge("a", "b", 0.97, "clip"), Edge("b", "c", 0.9, "phash"), Edge("c", "x", 0.99, "clip")]
    with TestPipeline(runner="DirectRunner") as p:
        out = {
            "info_batches": p | "I" >> beam.Create(_batches(infos)),
            "edges": p | "E" >> beam.Create(edges),
        } | FindDuplicates("resolution", exact=False)
        got = out["assignments"] | beam.Map(lambda a: a)
        assert_that(
            got,
            equal_to(
                [
                    ClusterAssignment("b", "a", 3, True, "phash", 1.0, "s0"),  # largest (s0's info); phash first
                    ClusterAssignment("a", "a", 3, False, "clip", 0.97, "s0"),
                    ClusterAssignment("c", "a", 3, False, "phash", 0.9, "s0"),
                ]  # "d" has no edge: no assignment (a cluster of one under its own key)
            ),
        )


def test_find_duplicates_incremental_join_drops_old_pairs():
    infos = [_info(k) for k in ("o1", "o2", "n1")]
    edges = [Edge("o1", "o2", 0.99, "clip"), Edge("n1", "o2", 0.98, "clip")]
    with TestPipeline(runner="DirectRunner") as p:
        old = p | "Old" >> beam.Create(["o1", "o2"])
        out = {
            "info_batches": p | "I" >> beam.Create(_batches(infos)),
            "edges": p | "E" >> beam.Create(edges),
        } | FindDuplicates("earliest", exact=False, old_keys=old)
        pairs = out["edges"] | beam.FlatMap(lambda b: [(e.key_a, e.key_b) for e in b.edges()])  # EdgeBatch
        assert_that(pairs, equal_to([("n1", "o2")]))
        sizes = out["assignments"] | "Sizes" >> beam.Map(lambda a: (a.key, a.cluster_id, a.cluster_size))
        assert_that(sizes, equal_to([("n1", "n1", 2), ("o2", "n1", 2)]), label="sizes")  # o1: alone


def test_rounds_order_keys_as_python_strings():
    """Non-ASCII keys, prefixes and a key ending in NUL: the root is Python's smallest key."""
    names = ["b", "a\x00", "a", "é", "Z", "ab", "日本", "a\x00x", "\U0001f600", "ba"]
    edges = [tuple(sorted(p)) for p in zip(names, names[1:], strict=False)] + [("x1", "x2")]
    labels = _run_rounds(edges, 8, n=3)
    assert labels == _scipy_labels(edges) == _run_rounds(edges, 8, n=3, local=True)
    assert set(labels.values()) == {min(names), "x1"}


def test_components_batched_output_by_bucket():
    from transforms.key_batches import bucket_of

    edges = _graph(3, 200, 150)
    truth = _scipy_labels(edges)
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(edges) | Components(rounds=12, buckets=3, batched=True)
        flat = out | beam.FlatMap(lambda kv: [(bucket_of(k, 3) == kv[0], k, r) for k, r in zip(*kv[1], strict=True)])
        assert_that(flat, equal_to([(True, k, r) for k, r in truth.items()]))
