"""Incremental dedup: new shards against an already-processed run, without touching old shards.

The earlier run's per-shard cache holds every old sample's decoded facts (SampleInfo: sizes,
byte and pixel digests) and perceptual-hash codes, and its annotations hold the old clusters.
A new run with ``dedup.incremental_from: OLD_RUN`` reads those back instead of re-reading,
decoding, hashing or embedding the old shards; old clusters come in as edges ("previous"), and
only edges that touch a new sample are taken from the new search. Components over both give the
clusters one run over everything would give.
"""

from __future__ import annotations

import glob
import os

import pyarrow.parquet as pq

from schemas.elements import Edge, Failure, SampleInfo

PREVIOUS = "previous"


def load_reference(run_dir: str) -> dict:
    """-> {"infos": [SampleInfo], "codes": [(key, bytes)], "edges": [Edge], "keys": set}."""
    from pipeline.config import ConfigError

    entries = sorted(glob.glob(os.path.join(run_dir, "cache", "shards", "*", "done.json")))
    if not entries or not os.path.isdir(os.path.join(run_dir, "annotations")):
        raise ConfigError(f"dedup.incremental_from: {run_dir} is not a finished run with a shard cache")
    infos, codes = [], []
    for done in entries:
        folder = os.path.dirname(done)
        infos += [SampleInfo(**r) for r in pq.read_table(os.path.join(folder, "infos.parquet")).to_pylist()]
        codes += [(r["key"], r["codes"]) for r in pq.read_table(os.path.join(folder, "codes.parquet")).to_pylist()]
    edges = []
    from transforms.write import read_table

    for r in read_table(os.path.join(run_dir, "annotations")).to_pylist():
        if r["status"] == "ok" and (r["cluster_size"] or 1) > 1 and r["cluster_id"] != r["key"]:
            a, b = sorted((r["cluster_id"], r["key"]))
            edges.append(Edge(a, b, float(r["cluster_similarity"] or 1.0), PREVIOUS))
    failures = read_table(os.path.join(run_dir, "failures"))
    old_failures = [
        Failure(r["key"], r["shard"], r["stage"], r["error_type"], r["message"] or "", r["url"] or "")
        for r in (failures.to_pylist() if failures is not None else [])
    ]
    return {"infos": infos, "codes": codes, "edges": edges, "keys": {i.key for i in infos}, "failures": old_failures}


def touches_new(edge: Edge, old_keys: set) -> bool:
    """Old-old pairs are already in the old clusters: only edges touching a new sample count."""
    return edge.embedder == PREVIOUS or edge.key_a not in old_keys or edge.key_b not in old_keys
