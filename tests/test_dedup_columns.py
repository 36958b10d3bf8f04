"""FindDuplicates' columnar path: EdgeBatch input, components on 64-bit key ids, id collisions."""

import random

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.arrow import info_table
from schemas.elements import Edge, EdgeBatch, SampleInfo
from transforms import cluster_columns
from transforms.cluster_columns import KeyIdCollision, assign_clusters, edge_batch, members
from transforms.components import id_edge_lists, large_star, small_star, star_labels
from transforms.dedup import FindDuplicates, _digest_edges, _digest_lists, assign_cluster
from transforms.key_batches import key_ids


def _labels(edges):
    """Reference components (scipy) -> {key: smallest key of its component}."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = sorted({k for e in edges for k in e})
    index = {k: i for i, k in enumerate(keys)}
    rows, cols = [index[a] for a, _ in edges], [index[b] for _, b in edges]
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(keys), len(keys)))
    _, labels = connected_components(graph, directed=False)
    first: dict = {}
    for k, lab in zip(keys, labels, strict=True):
        first.setdefault(lab, k)
    return {k: first[lab] for k, lab in zip(keys, labels, strict=True)}


def _random_case(seed: int, n: int = 300, m: int = 220):
    rng = random.Random(seed)
    names = [f"k{i:04d}" for i in range(n)] + ["é1", "日本", "a\x00"]
    edges = []
    for _ in range(m):
        a, b = rng.sample(names, 2)
        emb = rng.choice(["clip", "phash", "exact", "orb"])
        edges.append(Edge(min(a, b), max(a, b), round(rng.uniform(0.9, 1.0), 2), emb))
    infos = [
        SampleInfo(k, f"s{i % 3}", "", "", "", "", rng.choice([64, 128, 256]), 100, "{}", 0, 0, rng.randint(0, 9999))
        for i, k in enumerate(names)
        if i % 17  # some edge keys have no info (no assignment, as before)
    ]
    return edges, infos


def _reference(edges, infos, policy="resolution"):
    """The object path: scipy components + ``assign_cluster`` per cluster."""
    roots = _labels([(e.key_a, e.key_b) for e in edges])
    by_key = {i.key: i for i in infos}
    clusters: dict = {}
    for k, r in roots.items():
        if k in by_key:
            clusters.setdefault(r, []).append(by_key[k])
    out = []
    for r, ms in clusters.items():
        es = [e for e in edges if roots[e.key_a] == r]
        out.extend(assign_cluster(r, ms, es, policy))
    return out


def _as_batches(edges):
    """The same edges as EdgeBatches: split by embedder, half reversed, numpy unicode keys."""
    out = []
    for emb in sorted({e.embedder for e in edges}):
        es = [e for e in edges if e.embedder == emb]
        a = np.array([e.key_a if i % 2 else e.key_b for i, e in enumerate(es)], dtype=object)
        b = np.array([e.key_b if i % 2 else e.key_a for i, e in enumerate(es)], dtype=object)
        s = np.array([e.similarity for e in es], np.float32)
        out.append(EdgeBatch(a, b, s, emb))
    return out


def _run(edge_elements, infos, policy="resolution"):
    batches = [info_table([i for i in infos if i.shard == s]) for s in sorted({i.shard for i in infos})]
    with TestPipeline(runner="DirectRunner") as p:
        out = {
            "info_batches": p | "I" >> beam.Create(batches),
            "edges": p | "E" >> beam.Create(edge_elements, reshuffle=False),
        } | FindDuplicates(policy, exact=False, buckets=3)
        yield out, p


@pytest.mark.parametrize("policy", ["resolution", "earliest"])
def test_edge_batches_equal_single_edges_and_the_object_path(policy):
    edges, infos = _random_case(3)
    f32 = [Edge(e.key_a, e.key_b, float(np.float32(e.similarity)), e.embedder) for e in edges]
    expected = _reference(f32, infos, policy)
    assert len({a.cluster_id for a in expected}) > 5
    mixed = _as_batches(f32[: len(f32) // 2]) + f32[len(f32) // 2 :] + [Edge("k0001", "k0001", 1.0, "clip")]
    for elements in (f32, _as_batches(f32), mixed):
        for out, _ in _run(elements, infos, policy):
            assert_that(out["assignments"], equal_to(expected))


def test_id_components_equal_string_components():
    """Large-star/small-star on 64-bit ids gives the partition the string rounds give."""
    for seed in range(3):
        rng = random.Random(seed)
        names = [f"n{i:05d}" for i in range(2000)]
        pairs = {tuple(sorted(rng.sample(names, 2))) for _ in range(1700)}
        truth = _labels(sorted(pairs))
        lo, hi = (np.array(x, dtype=object) for x in zip(*sorted(pairs), strict=True))
        ia, ib = key_ids(lo), key_ids(hi)
        lists = list(id_edge_lists((np.minimum(ia, ib), np.maximum(ia, ib)), 4))
        for _ in range(12):
            lists = [kv for item in _group(lists) for kv in large_star(item, 4)]
            lists = [kv for item in _group(lists) for kv in small_star(item, 4)]
        root_of = {}
        for item in _group(lists):
            for _, (nodes, roots) in star_labels(item, 12):
                assert nodes.dtype == np.int64
                root_of.update(zip(nodes.tolist(), roots.tolist(), strict=True))
        id_of = dict(zip(np.r_[lo, hi].tolist(), np.r_[ia, ib].tolist(), strict=True))
        assert 1 < len(set(truth.values())) < len(truth) / 2  # many components, some large
        groups_ids: dict = {}
        for k in truth:
            groups_ids.setdefault(root_of[id_of[k]], set()).add(k)
        groups_str: dict = {}
        for k, r in truth.items():
            groups_str.setdefault(r, set()).add(k)
        assert sorted(map(sorted, groups_ids.values())) == sorted(map(sorted, groups_str.values()))
        for r, ks in groups_ids.items():
            assert r == min(id_of[k] for k in ks)  # the root is the component's smallest id


def _group(items):
    out: dict = {}
    for b, (src, dst) in items:
        half = len(src) // 2
        out.setdefault(b, []).extend([(src[:half], dst[:half]), (src[half:], dst[half:])])
    return sorted(out.items())


def test_key_ids_are_stable_and_input_independent():
    keys = ["a", "a\x00", "", "é", "laion_000000001", "\U0001f600"]
    ids = key_ids(keys)
    assert ids.dtype == np.int64 and len(set(ids.tolist())) == len(keys)
    assert ids.tolist()[:2] == [2714998891557577425, -6966627565692673172]  # pinned: the same in every run
    assert (key_ids(np.array(keys, dtype=object)) == ids).all()
    assert (key_ids(pa.chunked_array([pa.array(keys[:2]), pa.array(keys[2:])])) == ids).all()
    assert (key_ids(pa.array(["x"] + keys).slice(1)) == ids).all()
    assert key_ids(["\ud800"]).shape == (1,)  # a lone surrogate hashes its surrogatepass bytes


def _colliding_ids(keys):
    """A stand-in id function: every key starting with "c" gets one id."""
    real = key_ids(keys)
    starts_c = np.array([str(k).startswith("c") for k in (keys.to_pylist() if hasattr(keys, "to_pylist") else keys)])
    return np.where(starts_c, np.int64(42), real)


def test_colliding_ids_fail_loudly_naming_both_keys(monkeypatch):
    monkeypatch.setattr(cluster_columns, "key_ids", _colliding_ids)
    infos = [SampleInfo(k, "s0", "", "", "", "", 10, 10) for k in ("a", "c1", "c2")]
    features = list(cluster_columns.feature_tables(info_table(infos), 1, False))
    roots = (np.array([42, _colliding_ids(["a"])[0]]), np.array([42, 42]))
    with pytest.raises(KeyIdCollision, match="'c1' and 'c2' share the 64-bit id 42"):
        list(members((0, {"root": [roots], "features": [f for _, f in features]}), 1))
    # an edge key with no info that shares an id with a member: found where the cluster meets
    batch = edge_batch(["a", "c9"], ["c1", "c1"], [0.95, 0.97], "clip")
    cols = cluster_columns.id_columns(batch)
    t = features[0][1].filter(pa.array([True, True, False])).append_column("root", pa.array([42, 42], pa.int64()))
    with pytest.raises(KeyIdCollision, match="'c1' and 'c9'"):
        list(assign_clusters((0, {"member": [t], "edge": [(*cols, np.full(2, 42))]}), "resolution"))


def test_digest_edges_are_a_star_to_the_smallest_key():
    infos = [
        SampleInfo(k, "s0", "", "", d, "", 1, 1) for k, d in [("b", "x"), ("a", "x"), ("c", "x"), ("d", "y"), ("e", "")]
    ]
    lists = [lst for _, lst in _digest_lists(info_table(infos), "sha256", 1)]
    (batch,) = list(_digest_edges((0, lists), "exact"))
    assert list(batch.edges()) == [Edge("a", "b", 1.0, "exact"), Edge("a", "c", 1.0, "exact")]
