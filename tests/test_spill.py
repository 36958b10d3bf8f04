"""Spilled row batches (transforms/spill.py): the cell search's vectors out of Beam's data plane."""

import os
import pickle

import numpy as np
import pytest
from test_s3 import s3_env  # noqa: F401  (moto's S3 server, started and stopped by the fixture)

from transforms import row_blobs, spill


def _batch(n=5, d=8, seed=0):
    rng = np.random.default_rng(seed)
    keys = np.array([f"key-{i}-é" for i in range(n)])
    return keys, rng.standard_normal((n, 1, d)).astype(np.float16), rng.integers(-1, 9, (n, 2)).astype(np.int32)


def test_local_round_trip_small_references_unique_files(tmp_path):
    keys, payload, cells = _batch()
    folder = spill.folder_of(str(tmp_path), "vectors-clip")
    a = spill.write(folder, keys, payload, cells, 3)
    b = spill.write(folder, keys, payload, cells, 3)  # a retried bundle writes the same rows again
    assert (
        a.path != b.path
        and a.rows == 5
        and sorted(os.listdir(folder)) == sorted(os.path.basename(r.path) for r in (a, b))
    )
    assert len(pickle.dumps(a)) < 400  # what travels through the runner
    assert a.nbytes == len(row_blobs.pack(keys, payload, cells, 3)) == os.path.getsize(a.path)
    k, p, c, g = row_blobs.rows_of(a)
    assert (k == keys).all() and np.array_equal(p, payload) and np.array_equal(c, cells) and g == 3
    assert spill.folder_of("") == ""  # no output folder: batches stay packed bytes in Beam


def test_a_truncated_file_is_an_error(tmp_path):
    ref = spill.write(str(tmp_path), *_batch()[:2])
    with open(ref.path, "r+b") as f:
        f.truncate(ref.nbytes - 3)
    with pytest.raises(EOFError):
        row_blobs.rows_of(ref)


_GOT: dict = {}  # the in-process runner's results (the test's own process)


def _collect(x, name, row):
    _GOT.setdefault(name, []).append(row(x))


def test_vector_edges_spilled_equal_in_beam(tmp_path):
    """The same edges and neighbours whether the vectors travel in Beam or as files; the files
    are there (the search read them), each stage wrote its own."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipeline.config import ClusterConfig
    from transforms.ann_edges import VectorEdges

    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, 32)).astype(np.float32)
    vecs = np.concatenate([base, base[:200] + 0.01 * rng.standard_normal((200, 32)).astype(np.float32)])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    keys = [f"k{i:04d}" for i in range(len(vecs))]
    batches = [(keys[s : s + 64], vecs[s : s + 64]) for s in range(0, len(keys), 64)]
    cfg = ClusterConfig(n_cells=6, cell_groups=3, second_cell_margin=0.05)
    got = {}
    for name, folder in (("beam", ""), ("spill", str(tmp_path / "spill"))):
        _GOT.clear()
        with TestPipeline(runner="DirectRunner") as p:
            out = p | beam.Create(batches) | VectorEdges(0.95, "clip", cfg, seed=0, spill=folder)
            out["edges"] | "E" >> beam.Map(_collect, "edges", lambda e: (e.key_a, e.key_b, round(e.similarity, 6)))
            out["neighbours"] | "N" >> beam.Map(_collect, "nn", lambda n: (n.key, n.nn_key))
        got[name] = (sorted(_GOT["edges"]), sorted(_GOT["nn"]))
    assert len(got["beam"][0]) >= 200 and got["spill"] == got["beam"]
    files = os.listdir(tmp_path / "spill")
    assert len(files) > len(batches)  # the reader's batches and the assignment's group files


def test_s3_round_trip(s3_env):  # noqa: F811
    import s3fs

    s3fs.S3FileSystem().mkdir("memsieve-spill")
    keys, payload, cells = _batch(40, 16)
    folder = spill.folder_of("s3://memsieve-spill/run/_staging/x", "vectors-clip")
    ref = spill.write(folder, keys, payload, cells, 2)
    assert ref.path.startswith("s3://memsieve-spill/run/_staging/x/_spill/vectors-clip/")
    k, p, c, g = row_blobs.rows_of(ref)
    assert (k == keys).all() and np.array_equal(p, payload) and np.array_equal(c, cells) and g == 2
    from transforms import fsio

    fsio.remove(spill.folder_of("s3://memsieve-spill/run/_staging/x"))
    assert not fsio.exists(ref.path)


def _laion_job(tmp_path, out):
    import sys

    from pipeline.config import load_job

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "scripts"))
    from make_laion_embeddings import generate
    from make_laion_embeddings import write as write_laion

    write_laion(str(tmp_path / "emb"), *generate(1200, 32, seed=5, topics=30), files=2)
    sets = ["output.report=false", "triggers.enabled=false", "diversify.enabled=false", "probe.enabled=false"]
    return load_job(os.path.join(root, "jobs", "laion_embeddings.yaml"), sets, str(tmp_path / "emb"), str(out))


def test_job_spills_and_removes_the_folder_even_when_it_fails(tmp_path, monkeypatch):
    """A LAION-layout job writes its vectors under <staging>/_spill (the cell groups; the reader's
    unit float16 batches are references to the input file's rows) and leaves none behind: neither
    after a commit nor after a failed search."""
    from pipeline.job import run_job
    from transforms import ann_edges, cell_search

    written = []
    real_write = spill.write
    monkeypatch.setattr(spill, "write", lambda folder, *a: written.append(folder) or real_write(folder, *a))
    cfg = _laion_job(tmp_path, tmp_path / "out")
    run_job(cfg)
    assert {os.path.basename(f) for f in written} == {"vectors-clip"} and len(written) >= 1
    assert all("/_staging/" in f and f.endswith("/_spill/vectors-clip") for f in written)
    assert not (tmp_path / "out" / "_staging").exists()

    def broken(*a, **k):
        raise RuntimeError("search failed")

    monkeypatch.setattr(ann_edges.cs, "search_group", broken)
    assert ann_edges.cs is cell_search
    with pytest.raises(Exception, match="search failed"):
        run_job(cfg)
    stages = list((tmp_path / "out" / "_staging").iterdir())  # kept until the next run on OUT
    assert len(stages) == 1 and not (stages[0] / "_spill").exists()


def test_job_removes_the_spill_folder_before_the_commit(tmp_path, monkeypatch):
    """The spill folder is unlinked on a thread while the tables are summarised: the commit
    waits for it, however slow, so OUT never holds a _spill folder."""
    import time

    from pipeline import job
    from transforms import fsio

    real_remove = fsio.remove
    removed = []

    def slow_remove(path):
        if path.endswith("/_spill"):
            time.sleep(1.0)
            removed.append(path)
        real_remove(path)

    monkeypatch.setattr(fsio, "remove", slow_remove)
    info = job.run_job(_laion_job(tmp_path, tmp_path / "out"))
    assert len(removed) == 1 and info["summary"]["keys"] == 1200
    assert not (tmp_path / "out" / "_spill").exists() and not (tmp_path / "out" / "_staging").exists()
