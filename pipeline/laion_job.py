"""The dedup job over LAION's precomputed-embedding layout (no pixels needed).

``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet``. Beam stages, with blocks of vectors
as elements: read each file -> sample -> FAISS k-means (one element) -> centroids as a side input
-> each block's vectors to their top-m cells -> (cell group, row ids) through the shuffle (ids
only: the workers read the vectors back from the memory-mapped files) -> in-cell matrix products
-> edges and nearest neighbours -> connected components, keepers and the output tables.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time

import apache_beam as beam
import numpy as np

from transforms import ann

log = logging.getLogger(__name__)


def layout(root: str) -> list[tuple[str, str | None]]:
    """[(npy, metadata parquet or None)] ordered by N."""

    def number(p: str) -> int:
        m = re.search(r"(\d+)\.npy$", p)
        return int(m.group(1)) if m else -1

    files = sorted(glob.glob(os.path.join(root, "img_emb", "*.npy")), key=lambda p: (number(p), p))
    out = []
    for f in files:
        meta = os.path.join(root, "metadata", f"metadata_{number(f)}.parquet")
        out.append((f, meta if os.path.isfile(meta) else None))
    return out


class _Vectors:
    """Memory-mapped files, opened once per worker: global row id -> vector."""

    def __init__(self, files: list[str], offsets: np.ndarray):
        self.files, self.offsets, self._maps = files, offsets, {}

    def rows(self, ids: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((len(ids), self._map(0).shape[1]), dtype=np.float32)
        for f in np.unique(which):
            sel = which == f
            out[sel] = self._map(int(f))[ids[sel] - self.offsets[f]]
        return out

    def _map(self, f: int):
        if f not in self._maps:
            self._maps[f] = np.load(self.files[f], mmap_mode="r")
        return self._maps[f]


def _sample(item, stride: int):
    f, start, path = item
    x = np.load(path, mmap_mode="r")
    return np.asarray(x[::stride], dtype=np.float32)


def _assign(item, centroids, top_m: int, groups: int):
    f, start, path = item
    x = np.load(path, mmap_mode="r")
    cells = ann.assign_cells(x, centroids, top_m)
    ids = np.repeat(np.arange(start, start + len(x), dtype=np.int64), top_m)
    flat = cells.ravel()
    keep = flat >= 0
    ids, flat = ids[keep], flat[keep]
    group = flat % groups
    for g in np.unique(group):
        sel = group == g
        yield int(g), (ids[sel], flat[sel])


class _CellPairs(beam.DoFn):
    def __init__(self, files, offsets, threshold):
        self.files, self.offsets, self.threshold = files, offsets, threshold

    def setup(self):
        self.vectors = _Vectors(self.files, self.offsets)

    def process(self, item):
        _, pieces = item
        ids = np.concatenate([p[0] for p in pieces])
        cells = np.concatenate([p[1] for p in pieces])
        order = np.lexsort((ids, cells))
        ids, cells = ids[order], cells[order]
        from pipeline import progress

        progress.advance("search", len(ids))
        bounds = np.flatnonzero(np.diff(cells)) + 1
        out = [[] for _ in range(5)]
        for members in np.split(ids, bounds):
            if len(members) < 2:
                continue
            for i, arr in enumerate(ann.cell_forest(members, self.vectors.rows(members), self.threshold)):
                out[i].append(arr)
        yield tuple(np.concatenate(o) if o else np.empty(0) for o in out)


def _train(samples: list[np.ndarray], k: int, seed: int) -> np.ndarray:
    return ann.train_centroids(np.concatenate(samples), k, seed)


def run_laion(cfg, beam_args: list[str]) -> dict:
    from pipeline import runinfo
    from pipeline.job import RUN_TABLES, beam_options

    started = time.time()
    root, out_dir = cfg.input.path, os.path.abspath(cfg.output.dir)
    files = layout(root)
    sizes = [np.load(f, mmap_mode="r").shape[0] for f, _ in files]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n, cc = int(offsets[-1]), cfg.dedup.cluster
    k = ann.choose_cells(n, cc.top_m, cc.n_cells)
    stride = max(1, n // (cc.sample_size or 40 * k))
    blocks = [(i, int(offsets[i]), f) for i, (f, _) in enumerate(files)]
    result_path = os.path.join(out_dir, "cache", "laion_pairs.npz")
    os.makedirs(os.path.dirname(result_path), exist_ok=True)
    p = beam.Pipeline(options=beam_options(cfg, beam_args))
    src = p | "Files" >> beam.Create(blocks)
    centroids = (
        src
        | "Sample" >> beam.Map(_sample, stride=stride)
        | "SampleList" >> beam.combiners.ToList()
        | "KMeans" >> beam.Map(_train, k=k, seed=cfg.run.seed)
    )
    _ = (
        src
        | "Assign"
        >> beam.FlatMap(_assign, centroids=beam.pvalue.AsSingleton(centroids), top_m=cc.top_m, groups=cc.cell_groups)
        | "ByCellGroup" >> beam.GroupByKey()
        | "CellPairs" >> beam.ParDo(_CellPairs([f for f, _ in files], offsets[:-1], cc.threshold))
        | "AllPairs" >> beam.combiners.ToList()
        | "SavePairs" >> beam.Map(_save_pairs, path=result_path, n=n)
        | "Centroids"
        >> beam.Map(
            lambda _, c, path: np.save(path, c),
            c=beam.pvalue.AsSingleton(centroids),
            path=os.path.join(out_dir, "cache", "centroids.npy"),
        )
    )
    from pipeline import progress

    with progress.live(len(files)):
        result = p.run()
        result.wait_until_finish()
    pipeline_s = time.time() - started
    from pipeline.laion_outputs import write_outputs

    stages = progress.stage_report(result)
    with progress.timed({"stages": stages}, "write"):
        counts = write_outputs(cfg, files, offsets, result_path, out_dir)
    info = {
        "job": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "versions": runinfo.package_versions(),
        "input": {
            "format": "laion_embeddings",
            "path": root,
            "files": [f for f, _ in files],
            "rows": n,
            "n_shards": len(files),
            "cells": k,
        },
        "counters": runinfo.beam_counters(result),
        "outputs": runinfo.table_counts(out_dir, RUN_TABLES),
        "timings_s": {"pipeline": round(pipeline_s, 3), "total": round(time.time() - started, 3)},
        "stages": stages,
        "summary": counts,
    }
    info["checksums"] = runinfo.checksums(out_dir, RUN_TABLES)
    runinfo.write_run_json(os.path.join(out_dir, "run.json"), info)
    log.info("laion job %s: %d rows, %d cells, %.1f s", cfg.name, n, k, info["timings_s"]["total"])
    return info


def _save_pairs(results, path: str, n: int) -> str:
    cat = [np.concatenate([r[i] for r in results]) if results else np.empty(0) for i in range(5)]
    a, b = cat[0].astype(np.int64), cat[1].astype(np.int64)  # spanning-forest edges of each cell
    nn, nn_sim = ann.best_neighbours(n, cat[2].astype(np.int64), cat[3].astype(np.int64), cat[4].astype(np.float32))
    tmp = path + ".tmp.npz"
    np.savez(tmp, a=a, b=b, nn=nn, nn_sim=nn_sim)
    os.replace(tmp, path)
    return path
