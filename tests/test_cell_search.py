"""The cell search's columnar outputs (EdgeBatch, Arrow neighbour tables), its bounded k-means
sample, and the batched neighbours writer (float-vector search itself: tests/test_ann.py)."""

import os
import sys

import numpy as np
import pytest

from transforms import cell_products, cell_search

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
from make_laion_embeddings import generate  # noqa: E402


@pytest.fixture(scope="module")
def small():
    vectors, _ = generate(1500, 48, seed=5, topics=12)
    keys = [f"k{i:05d}" for i in range(len(vectors))]
    return keys, vectors


def _run_vector_edges(keys, vectors, **batched):
    """VectorEdges on the DirectRunner -> (edge elements, neighbour elements), collected."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipeline.config import ClusterConfig
    from transforms.ann_edges import VectorEdges

    got = COLLECTED.setdefault(str(sorted(batched.items())), {"edges": [], "neighbours": []})
    cfg = ClusterConfig(n_cells=12, cell_groups=4, second_cell_margin=0.05)
    batches = [(keys[s : s + 400], vectors[s : s + 400]) for s in range(0, len(keys), 400)]
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(batches) | VectorEdges(0.9, "clip", cfg, seed=0, **batched)
        for name in got:
            out[name] | f"Collect{name}" >> beam.Map(_collect, str(sorted(batched.items())), name)
    return got


COLLECTED: dict = {}  # the DirectRunner runs in this process: elements land here


def _collect(element, run: str, name: str) -> None:
    COLLECTED[run][name].append(element)


def test_batched_outputs_equal_single_elements(small):
    from schemas.elements import Edge, EdgeBatch, Neighbour

    keys, vectors = small
    plan = cell_search.search_in_memory(
        np.array(keys), vectors[:, None, :], (0,), 0.9, requested_cells=12, min_groups=4, margin=0.05
    )["plan"]
    assert (cell_search.assign(vectors[:, None, :], plan)[:, 1] >= 0).sum() > 20  # rows in two cells combined
    single = _run_vector_edges(keys, vectors)
    batched = _run_vector_edges(keys, vectors, batched_edges=True, batched_neighbours=True)
    assert single["edges"] and all(isinstance(e, Edge) for e in single["edges"])
    assert all(isinstance(n, Neighbour) for n in single["neighbours"])
    assert batched["edges"] and all(isinstance(b, EdgeBatch) and len(b) for b in batched["edges"])
    assert all((b.key_a < b.key_b).all() and b.embedder == "clip" for b in batched["edges"])
    from dataclasses import astuple

    from_batches = sorted(astuple(e) for b in batched["edges"] for e in b.edges())
    assert from_batches == sorted(astuple(e) for e in single["edges"])  # keys, similarity, embedder alike
    tables = batched["neighbours"]
    assert all(t.schema.names == ["key", "embedder", "nn_key", "nn_similarity"] for t in tables)
    rows = sorted((r["key"], r["embedder"], r["nn_key"], r["nn_similarity"]) for t in tables for r in t.to_pylist())
    want = sorted((n.key, n.embedder, n.nn_key, n.nn_similarity) for n in single["neighbours"])
    assert rows == want and len({r[0] for r in rows}) == len(rows) == len(keys)


def test_sample_rows_is_the_cap_smallest_whatever_the_order():
    from transforms.ann_edges import SampleRows

    rng = np.random.default_rng(0)
    keys = np.array([f"row{i}" for i in range(5000)])
    payload = rng.standard_normal((5000, 1, 4)).astype(np.float16)
    prio = cell_search.key_priority(keys, 7)
    want = payload[np.lexsort((keys, prio))[:300]]
    fn = SampleRows(300, 7)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(5000)
        accs = []
        for part in np.array_split(order, 4):  # four bundles, merged in another order
            acc = fn.create_accumulator()
            for rows in np.array_split(part, 9):
                acc = fn.add_input(acc, (keys[rows], payload[rows]))
            if seed:  # what a runner may do before sending a partial accumulator on
                acc = fn.compact(acc)
                assert acc.fill <= 300
            accs.append(acc)
        n, sample = fn.extract_output(fn.merge_accumulators(accs[::-1]))
        assert n == 5000 and sample.shape == (300, 1, 4) and (sample == want).all()
    assert fn.extract_output(fn.create_accumulator()) == (0, None)


def test_write_batches_tables_equal_rows(tmp_path):
    import apache_beam as beam
    import pyarrow.parquet as pq
    from apache_beam.testing.test_pipeline import TestPipeline

    from schemas import arrow
    from transforms.ann_edges import neighbour_table
    from transforms.write import WriteBatches, bucket

    rng = np.random.default_rng(2)
    keys = np.array([f"key{i:04d}" for i in rng.permutation(600)])
    other = np.roll(keys, 1)
    sims = rng.uniform(0.2, 1.0, 600)
    lists = [
        [{"key": k, "embedder": "clip", "nn_key": o, "nn_similarity": float(s)} for k, o, s in zip(*c, strict=True)]
        for c in zip(np.array_split(keys, 3), np.array_split(other, 3), np.array_split(sims, 3), strict=True)
    ]
    tables = [neighbour_table(keys[:250], other[:250], sims[:250], "clip"), lists[2][-200:]]
    tables.insert(1, neighbour_table(keys[250:400], other[250:400], sims[250:400], "clip"))

    def parts(t):
        return [f"{e}-{bucket(k, 3)}" for e, k in zip(t["embedder"].to_pylist(), t["key"].to_pylist(), strict=True)]

    for name, elements in (("rows", lists), ("tables", tables)):
        with TestPipeline(runner="DirectRunner") as p:
            _ = (
                p
                | f"Create{name}" >> beam.Create(elements)
                | WriteBatches(
                    str(tmp_path / name),
                    arrow.TABLES["neighbours"],
                    lambda r: f"{r['embedder']}-{bucket(r['key'], 3)}",
                    lambda r: (r["key"],),
                    table_partition=parts,
                    sort_columns=("key",),
                )
            )
    names = sorted(os.listdir(tmp_path / "rows"))
    assert names == sorted(os.listdir(tmp_path / "tables")) and len(names) == 3
    for name in names:
        a, b = pq.read_table(tmp_path / "rows" / name), pq.read_table(tmp_path / "tables" / name)
        assert a.equals(b) and a.schema.metadata == b.schema.metadata
        assert a.column("key").to_pylist() == sorted(a.column("key").to_pylist())


def test_search_group_threads_give_the_same_results(small, monkeypatch):
    keys, vectors = small
    keys = np.asarray(keys)
    vecs = np.asarray(vectors, dtype=np.float16)[:, None, :]
    plan = cell_search.make_plan(len(keys), vecs[:, 0].astype(np.float32), requested_cells=12, seed=0)
    cells = cell_search.assign(vecs, plan)
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cell_search, "SEARCH_THREADS", threads)
        runs.append(cell_search.search_group(keys, vecs, cells, 0, 1, (0,), 0.9, forest=True))
    assert len(runs[0]["edges"][0]) > 0
    for other in runs[1:]:
        for name, cols in runs[0].items():
            for a, b in zip(cols, other[name], strict=True):
                np.testing.assert_array_equal(a, b)


def _cell_with_copies(m: int, d: int = 64, seed: int = 3) -> np.ndarray:
    """(m, 1, d) float32 unit rows: near-duplicate clusters around the threshold and exact copies
    (equal products: ties for the nearest neighbour)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(np.float32)
    x[m // 2 : m // 2 + m // 4] = x[: m // 4] + 0.33 * rng.standard_normal((m // 4, d)).astype(np.float32)
    x[-20:] = x[5:25]  # exact copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)[:, None, :]


@pytest.mark.parametrize("m", [300, 700, 1100])
def test_fp32_upper_triangle_equals_the_full_product(m):
    """fp32 cells multiply each pair once (blocks of rows against later columns): the pairs, their
    values and each row's nearest (the first of equal maxima) are the full product's, bit for bit."""
    import torch

    x = _cell_with_copies(m)
    full = torch.from_numpy(x[:, 0]) @ torch.from_numpy(x[:, 0]).T
    full.fill_diagonal_(-np.inf)
    best, nn = full.max(dim=1)
    i, j = np.nonzero(np.triu(full.numpy() >= 0.9, 1))
    got = cell_search.search_cell(x, (0,), 0.9, bf16=False)
    assert len(i) > m // 10
    np.testing.assert_array_equal(got[0], i), np.testing.assert_array_equal(got[1], j)
    np.testing.assert_array_equal(got[2], full.numpy()[i, j])
    np.testing.assert_array_equal(got[3], nn.numpy()), np.testing.assert_array_equal(got[4], best.numpy())
    assert (got[3][-20:] == np.arange(5, 25)).all()  # an exact copy's nearest: the first of its equals


@pytest.mark.parametrize("m", [600, 1024, 1030, 1500])
def test_symmetric_product_and_dense_recheck_equal_the_full_product(m):
    import torch

    x = torch.from_numpy(_cell_with_copies(m)[:, 0])
    for t in (x, x.to(torch.bfloat16)):
        assert torch.equal(cell_products.symmetric_product(t), t @ t.T)
    hit = np.stack(np.nonzero(np.triu((x @ x.T).numpy() >= 0.85, 1)), axis=1)
    np.testing.assert_array_equal(cell_products.dense_recheck(x, hit), (x @ x.T).numpy()[hit[:, 0], hit[:, 1]])
    assert cell_products.dense_recheck(x, hit[:3]) is None  # too thin: the caller multiplies the block


def test_dedup_keys_sorted_unique_and_repeated():
    rng = np.random.default_rng(0)
    keys = np.array([f"k{i:04d}" for i in rng.permutation(300)])
    vecs = rng.standard_normal((300, 1, 8)).astype(np.float16)
    got = cell_search.dedup_keys(keys, vecs)
    assert (keys[got] == np.sort(keys)).all()  # unique keys: every row, by key
    keys[:5] = keys[10:15]  # repeated: the row of the smaller first vector value is kept
    got = cell_search.dedup_keys(keys, vecs)
    assert len(got) == 295 and (keys[got][1:] > keys[got][:-1]).all()
    for a, b in zip(range(5), range(10, 15), strict=True):
        kept = a if (vecs[a, 0, 0], a) < (vecs[b, 0, 0], b) else b
        assert kept in got and (a + b - kept) not in got
