"""Semantic-duplicate edges from embedding batches (the webdataset path's CLIP stage).

Batches of (keys, unit vectors) are gathered and searched with the same cell algorithm as the
LAION job (``transforms.ann``): top-m k-means cells, in-cell products, edges above the cosine
threshold, nearest neighbour per sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import Edge, Neighbour
from transforms import ann


def _search(batches, threshold: float, embedder: str, top_m: int, n_cells: int, seed: int) -> Iterator:
    pairs = sorted(
        ((k, v) for keys, vecs in batches for k, v in zip(keys, np.asarray(vecs), strict=True)), key=lambda kv: kv[0]
    )
    seen, keys, rows = set(), [], []
    for k, v in pairs:
        if k not in seen:  # a key repeated across shards: the first one counts
            seen.add(k)
            keys.append(k)
            rows.append(v)
    if len(keys) < 2:
        return
    x = np.stack(rows).astype(np.float32)
    a, b, s, nn, nn_sim, _, _ = ann.dedup_in_memory(x, threshold, top_m=top_m, n_cells=n_cells, seed=seed)
    for i, j, sim in zip(a.tolist(), b.tolist(), s.tolist(), strict=True):
        yield Edge(keys[i], keys[j], float(sim), embedder)
    for i, (j, sim) in enumerate(zip(nn.tolist(), nn_sim.tolist(), strict=True)):
        if j >= 0:
            yield beam.pvalue.TaggedOutput("neighbours", Neighbour(keys[i], embedder, keys[j], float(sim)))


class VectorEdges(beam.PTransform):
    """(keys, vectors) batches -> {"edges": Edge, "neighbours": Neighbour}."""

    def __init__(self, threshold: float, embedder: str, cluster_cfg, seed: int):
        super().__init__()
        self.threshold, self.embedder, self.cluster_cfg, self.seed = threshold, embedder, cluster_cfg, seed

    def expand(self, batches):
        from transforms.outputs import multi_output

        gathered = batches | "GatherVectors" >> beam.combiners.ToList()
        out = multi_output(
            gathered,
            "SearchVectors",
            _search,
            ["neighbours"],
            "edges",
            threshold=self.threshold,
            embedder=self.embedder,
            top_m=self.cluster_cfg.top_m,
            n_cells=self.cluster_cfg.n_cells,
            seed=self.seed,
        )
        return {"edges": out["edges"], "neighbours": out["neighbours"]}
