"""The cell search's plan (transforms/cell_plan.py): the cheaper k-means and assignment give the
same bits as the reference ones, and the split shuffles of CellSearch the same results."""

import os
import sys

import numpy as np
import pytest

from transforms import ann, cell_plan, row_blobs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
from make_laion_embeddings import generate  # noqa: E402


@pytest.fixture(scope="module")
def vectors():
    x, _ = generate(3000, 64, seed=11, topics=30)
    return x.astype(np.float16)


@pytest.mark.parametrize("bf16", [True, False])
def test_train_centroids_equals_the_reference_bit_for_bit(vectors, bf16, monkeypatch):
    monkeypatch.setattr(cell_plan, "KMEANS_BLOCK", 700)  # several blocks, a short last one
    x = vectors.astype(np.float32)
    for k in (2, 45):
        want = ann.train_centroids(x, k, seed=3, bf16=bf16)
        got = cell_plan.train_centroids(x, k, seed=3, bf16=bf16)
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("native", ["0", "1"])
def test_float16_rows_get_the_cells_of_their_float32_copy(vectors, native, monkeypatch):
    monkeypatch.setenv("MEMSIEVE_BF16", native)
    cell_plan.bf16_native.cache_clear()
    try:
        cent = cell_plan.train_centroids(vectors[:1500].astype(np.float32), 40, seed=0)
        for second in (True, False):
            plan = cell_plan.Plan(cent, 4, 0.05, second)
            want = cell_plan.assign(vectors[:, None].astype(np.float32), plan, batch=1000)
            got = cell_plan.assign(vectors[:, None], plan, batch=1000)
            assert np.array_equal(got, want)
            assert ((want[:, 1] >= 0).sum() > 50) if second else want.shape[1] == 1
            assert (want[:, 0] >= 0).all() and (np.diff(want, axis=1) <= 0).all()
    finally:
        cell_plan.bf16_native.cache_clear()


def test_sample_buffer_compacts_in_place_to_the_smallest_rows():
    """The held rows fill one buffer; compaction moves the cap smallest (priority, key) forward
    in place (blocks of 4096 rows, rows that stay put and rows that move far) and tightens the
    bound; pickled, the accumulator keeps only its rows."""
    import pickle

    rng = np.random.default_rng(1)
    cap, held = 5000, cell_plan._Held()
    prios, keys, rows = [], [], []
    for n in (3000, 1, 4000, 2999):  # 10,000 rows: full at 2 x cap
        p = rng.integers(0, 1 << 40, n).astype(np.uint64)
        k = np.array([f"k{len(prios)}-{i}" for i in range(n)])
        x = rng.standard_normal((n, 1, 3)).astype(np.float16)
        take = np.flatnonzero(rng.random(n) < 0.999)
        held.add(p, k, x, take, cap)
        prios.append(p[take]), keys.append(k[take]), rows.append(x[take])
    p, k, x = np.concatenate(prios), np.concatenate(keys), np.concatenate(rows)
    assert held.fill == len(p) and np.array_equal(held.rows[: held.fill], x)
    held.compact(cap)
    keep = np.sort(np.lexsort((k, p))[:cap])
    assert held.fill == cap and np.array_equal(held.rows[:cap], x[keep]) and held.bound == p[keep].max()
    assert np.array_equal(held.held()[0], p[keep]) and np.array_equal(held.held()[1], k[keep])
    back = pickle.loads(pickle.dumps(held))
    assert len(back.rows) == cap and np.array_equal(back.rows, x[keep]) and back.bound == held.bound


def test_key_priority_is_pandas_categorized_hash():
    """The sample's priorities: pandas' default hash_array (factorize, then SipHash each distinct
    key), with repeated, empty, non-ASCII and long keys, from lists and numpy string arrays."""
    import pandas as pd

    keys = ["a", "", "bé", "a", "x" * 300, "日本語", "00000000001", "bé", "a b"] * 3
    for seed in (0, 7):
        want = pd.util.hash_array(np.asarray(keys, dtype=object), hash_key=f"memsieve{seed:08d}"[:16])
        for given in (keys, np.array(keys)):
            got = cell_plan.key_priority(given, seed)
            assert got.dtype == np.uint64 and np.array_equal(got, want.astype(np.uint64))
    assert not np.array_equal(cell_plan.key_priority(keys, 0), cell_plan.key_priority(keys, 1))


def test_training_rows_is_what_make_plan_trains_on(vectors, monkeypatch):
    """``_plan`` converts only the sample rows k-means uses: the same plan as from all of them."""
    from transforms.ann_edges import _plan, float_vectors

    settings = {
        "single_cell_below": 100,
        "requested_cells": 12,
        "sample_size": 0,
        "margin": 0.02,
        "top_m": 2,
        "target_group_rows": 1000,
        "min_groups": 1,
        "seed": 0,
    }
    payload = vectors[:, None]
    seen = []
    monkeypatch.setattr(cell_plan, "train_centroids", lambda s, *a, **k: seen.append(len(s)) or s[:12])
    plan = _plan((3000, payload), float_vectors, (0,), settings)
    assert seen == [cell_plan.training_rows(12)] and plan.cells == 12 and plan.groups == 3
    full = cell_plan.make_plan(3000, payload[:, 0].astype(np.float32), **settings)
    assert np.array_equal(plan.centroids, full.centroids)


def test_assign_cells_holds_rows_and_sends_one_element_per_group(vectors):
    """However often AssignCells flushes, each group gets exactly its rows, in arrival order."""
    import apache_beam as beam

    from transforms.ann_edges import AssignCells, float_vectors

    keys = np.array([f"k{i:05d}" for i in range(len(vectors))])
    cent = cell_plan.train_centroids(vectors[:1500].astype(np.float32), 30, seed=0)
    plan = cell_plan.Plan(cent, 5, 0.05, True)
    cells = cell_plan.assign(vectors[:, None], plan)
    results = []
    for flush in (10**9, 700):
        fn = AssignCells(float_vectors, (0,), 3, flush_rows=flush)
        fn.start_bundle()
        out = [
            o
            for s in range(0, len(keys), 400)
            for o in fn.process((keys[s : s + 400], vectors[s : s + 400, None]), plan)
        ]
        out += [beam.pvalue.TaggedOutput(o.tag, o.value.value) for o in fn.finish_bundle()]  # WindowedValues
        out = [(o.tag, o.value[0], row_blobs.unpack(o.value[1])) for o in out]  # packed bytes
        assert all(tag == str(g % 3) and rows[3] == 5 for tag, g, rows in out)
        assert len(out) == 5 if flush > len(keys) else len(out) > 5  # one element per group, or per flush
        got = {}
        for _, g, rows in out:
            got.setdefault(g, []).append(rows[:3])
        results.append({g: tuple(np.concatenate([p[i] for p in parts]) for i in range(3)) for g, parts in got.items()})
    for g in range(5):
        rows = np.flatnonzero((cell_plan.groups_of(cells, 5) == g).any(axis=1))
        for found in results:
            k, payload, c = found[g]
            assert np.array_equal(k, keys[rows]) and np.array_equal(c, cells[rows])
            assert np.array_equal(payload[:, 0], vectors[rows])


def test_group_rows_of_equals_a_scan_per_group():
    """AssignCells' grouping (one sort of (group, row) pairs) gives each group's rows as a scan
    of every row per group would: groups ascending, rows ascending, a row twice in one group once."""
    from transforms.ann_edges import _group_rows_of

    rng = np.random.default_rng(0)
    for _ in range(200):
        in_group = rng.integers(-1, 6, (int(rng.integers(0, 40)), int(rng.integers(1, 4))))
        want = [(g, np.flatnonzero((in_group == g).any(axis=1))) for g in np.unique(in_group[in_group >= 0]).tolist()]
        got = list(_group_rows_of(in_group))
        assert [g for g, _ in got] == [g for g, _ in want]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))


def test_bf16_argmax_is_the_float32_images_first_maximum():
    """k-means' nearest centre from the bf16 bits: ties (first wins), negative and zero rows,
    -0 against +0, infinities and NaN, as numpy's argmax of the float32 image."""
    import torch

    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((500, 37)).astype(np.float32)).to(torch.bfloat16)
    x[0, 3] = x[0, 9] = 50.0  # a tie: the first
    x[1] = -torch.rand(37).to(torch.bfloat16) - 0.1  # all negative
    x[2] = 0.0
    x[2, 5] = -0.0  # -0 and +0 are equal
    x[3, :] = -1.0
    x[3, 30] = -0.0
    x[4, 7], x[5, 2], x[6, 4] = float("inf"), float("nan"), float("-inf")
    want = x.float().numpy().argmax(axis=1)
    assert np.array_equal(cell_plan._bf16_argmax(x), want)


def _nearest_by_topk(x, ct_low, c32, c_norm, per, margin):
    """The reference: the bf16 top per + 2 of every row, then the fp32 ranking of unsure rows."""
    import torch

    top = torch.topk(x.to(torch.bfloat16) @ ct_low, per + 2, dim=1)
    values, short = top.values.float(), top.indices
    eps = cell_plan.BF16_EPS * float(torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).max()) * c_norm
    rows = torch.nonzero(values[:, 0] - values[:, 1] <= (margin if per == 2 else 0.0) + 2 * eps)[:, 0]
    values, ids = values[:, :per].clone(), short[:, :per].clone()
    if len(rows):
        exact = torch.bmm(c32[short[rows]], x[rows].float()[:, :, None])[:, :, 0]
        best = torch.topk(exact, per, dim=1)
        values[rows], ids[rows] = best.values, torch.gather(short[rows], 1, best.indices)
    return values, ids


@pytest.mark.parametrize("per", [1, 2])
def test_nearest_centroids_equal_a_full_top_k(vectors, per):
    """Two reductions of the bits and a top-k of the unsure rows give the full top-k's cells:
    ties (a repeated centroid), a row whose only positive product is just above a negative second
    one (negative bits do not order as their values), an all-zero row, margins."""
    import torch

    cent = cell_plan.train_centroids(vectors[:1500].astype(np.float32), 40, seed=0)
    cent[:, 0] = -np.abs(cent[:, 0]) - 0.3  # every product with e0 is below -0.2
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    pair = np.zeros((2, 64), np.float32)
    pair[:, 0], pair[0, 1], pair[1, 2] = (0.01, -0.005), np.sqrt(1 - 1e-4), np.sqrt(1 - 2.5e-5)
    cent = np.concatenate([cent, cent[:3], pair]).astype(np.float32)  # equal products: ties
    x = vectors.astype(np.float32)
    x[:20], x[20:25] = np.eye(64)[0], 0.0  # e0: one positive product, then -0.005, then < -0.2
    assert ((x[:20] @ cent.T) < -0.2).sum(axis=1).min() == len(cent) - 2
    xt = torch.from_numpy(x)
    c32, ct, ct_low, c_norm = cell_plan._centroid_tensors(cent, True)
    for margin in (0.0, 0.02, 0.3):
        want = _nearest_by_topk(xt, ct_low, c32, c_norm, per, margin)
        got = cell_plan._nearest_centroids(xt, ct_low, c32, c_norm, per, margin)
        keep = (want[0][:, 0] - want[0][:, -1] <= margin).numpy() if per == 2 else np.ones(len(x), bool)
        assert torch.equal(got[0][:, 0], want[0][:, 0]) and torch.equal(got[1][:, 0], want[1][:, 0])
        assert torch.equal(got[0][keep], want[0][keep]) and torch.equal(got[1][keep], want[1][keep])


def test_assign_steps_of_any_size_give_the_same_cells(vectors, monkeypatch):
    """Steps whose rows are padded with zero rows to a multiple of SHAPE_STEP (1000, 77) or not
    (1024, all at once) place every row in the same cells."""
    monkeypatch.setenv("MEMSIEVE_BF16", "1")
    cell_plan.bf16_native.cache_clear()
    try:
        cent = cell_plan.train_centroids(vectors[:1500].astype(np.float32), 40, seed=0)
        plan = cell_plan.Plan(cent, 4, 0.05, True)
        want = cell_plan.assign(vectors[:, None], plan, batch=len(vectors))
        for batch in (1000, 1024, 77):
            assert np.array_equal(cell_plan.assign(vectors[:, None], plan, batch=batch), want)
    finally:
        cell_plan.bf16_native.cache_clear()
