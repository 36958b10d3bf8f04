"""Float-vector near-duplicate search on small generated data (the LAION layout: tests/test_laion.py)."""

import os
import sys

import numpy as np
import pytest

from transforms import ann

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
