"""Float-vector near-duplicate search on small generated data (the LAION layout: tests/test_laion.py)."""

import os
import sys

import numpy as np
import pytest

from transforms import ann, cell_search

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
from make_laion_embeddings import generate  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return generate(6000, 64, seed=3, topics=40)


def _cluster_pairs(labels):
    out = set()
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        out.update((int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :])
    return out


def test_in_memory_matches_exact_pairs(small):
    vectors, _ = small
    a, b, s, nn, nn_sim, labels, _ = ann.dedup_in_memory(vectors, 0.9, top_m=2, seed=0)
    truth = ann.exact_pairs(vectors, 0.9)
    assert truth and set(zip(a.tolist(), b.tolist(), strict=True)) == truth
    assert _cluster_pairs(labels) >= truth
    x = vectors.astype(np.float32)
    i = int(np.argmax(nn_sim))
    assert nn_sim[i] == pytest.approx(float(x[i] @ x[nn[i]]), abs=1e-4)


def test_top1_cells_lose_pairs_that_top2_keeps(small):
    vectors, _ = small
    truth = ann.exact_pairs(vectors, 0.9)
    a1, b1, *_ = ann.dedup_in_memory(vectors, 0.9, top_m=1, n_cells=40, seed=0)
    a2, b2, *_ = ann.dedup_in_memory(vectors, 0.9, top_m=2, n_cells=40, seed=0)
    assert len(a1) <= len(a2) and len(a2) >= 0.99 * len(truth)
    assert set(zip(a2.tolist(), b2.tolist(), strict=True)) <= truth


def test_cell_forest_components():
    ids = np.array([10, 11, 12, 13])
    v = np.array([[1, 0], [0.999, 0.0447], [0, 1], [0.0447, 0.999]], dtype=np.float32)
    a, b, who, nn, sim = ann.cell_forest(ids, v, 0.95)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(10, 11), (12, 13)]
    assert dict(zip(who.tolist(), nn.tolist(), strict=True)) == {10: 11, 11: 10, 12: 13, 13: 12}


def _key_pairs(keys, edges):
    a, b, _ = edges
    return set(zip(a.tolist(), b.tolist(), strict=True))


def _brute_nn(x):
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1), sims.max(axis=1)


def test_cell_search_single_cell_is_exact(small):
    vectors, _ = small
    keys = np.array([f"k{i:05d}" for i in range(len(vectors))])
    truth = {(keys[i], keys[j]) for i, j in ann.exact_pairs(vectors, 0.9)}
    nn, sim = _brute_nn(vectors.astype(np.float32))
    for bf16 in (False, True):
        found = cell_search.search_in_memory(keys, vectors[:, None, :], (0,), 0.9, bf16=bf16)
        assert found["plan"].cells == 1
        assert _key_pairs(keys, found["edges"]) == truth
        who, other, nn_sim = found["nn"]
        assert (who == keys).all()
        if not bf16:  # fp32: the exact nearest neighbour
            assert (other == keys[nn]).all() and np.allclose(nn_sim, sim, atol=1e-5)
        else:  # bf16 top candidates re-scored in fp32: exact similarity, choice within the bf16 error
            assert (other == keys[nn]).mean() > 0.99 and (nn_sim >= sim - 2 * cell_search.BF16_EPS).all()


@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_cell_search_partitioned_each_pair_once(small, margin):
    vectors, _ = small
    keys = np.array([f"k{i:05d}" for i in range(len(vectors))])
    found = cell_search.search_in_memory(
        keys, vectors[:, None, :], (0,), 0.9, requested_cells=40, margin=margin, min_groups=3
    )
    a, b, s = found["edges"]
    assert found["plan"].groups == 3 and (a < b).all()
    assert len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(a)  # the smallest shared cell reports
    truth = {(keys[i], keys[j]) for i, j in ann.exact_pairs(vectors, 0.9)}
    got = _key_pairs(keys, found["edges"])
    assert got <= truth and len(got) >= (0.99 if margin else 0.95) * len(truth)
    assert len(found["nn"][0]) == len(set(found["nn"][0].tolist())) == len(keys)


def test_bf16_decisions_equal_fp32():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((600, 96)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noise = rng.standard_normal((600, 96)).astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(0.85, 0.95, (600, 1)).astype(np.float32)  # pairs straddling the threshold closely
    x = np.concatenate([base, cos * base + np.sqrt(1 - cos**2) * noise])[:, None, :]
    x = x.astype(np.float16).astype(np.float32)
    exact = cell_search.search_cell(x, (0,), 0.9, bf16=False)
    low = cell_search.search_cell(x, (0,), 0.9, bf16=True)
    assert len(exact[0]) > 100
    for e, lo in zip(exact[:3], low[:3], strict=True):
        assert np.allclose(e, lo, atol=1e-5)
    assert (exact[3] == low[3]).all() and np.allclose(exact[4], low[4], atol=1e-5)


def test_vector_edges_on_pipeline_match_in_memory(small):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.config import ClusterConfig
    from transforms.ann_edges import VectorEdges

    vectors, _ = small
    vectors = vectors[:1500]
    keys = [f"k{i:05d}" for i in range(len(vectors))]
    cfg = ClusterConfig(n_cells=12, cell_groups=4)
    found = cell_search.search_in_memory(
        np.array(keys), vectors[:, None, :], (0,), 0.9, requested_cells=12, min_groups=4, margin=0.05
    )
    want_edges = sorted(_key_pairs(keys, found["edges"]))
    want_nn = sorted(zip(found["nn"][0].tolist(), found["nn"][1].tolist(), strict=True))
    batches = [(keys[s : s + 400], vectors[s : s + 400]) for s in range(0, len(keys), 400)]
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(batches) | VectorEdges(0.9, "clip", cfg, seed=0)
        assert_that(out["edges"] | beam.Map(lambda e: (e.key_a, e.key_b)), equal_to(want_edges))
        assert_that(out["neighbours"] | beam.Map(lambda n: (n.key, n.nn_key)), equal_to(want_nn), label="nn")
