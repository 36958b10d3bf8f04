"""Incremental dedup: new shards against an already-processed run, without touching old shards.

The earlier run's per-shard cache holds every old sample's decoded facts (SampleInfo: sizes,
byte and pixel digests) and perceptual-hash codes, and its annotations hold the old clusters.
Only the entries of the shards its ``run.json`` lists are read, found by their content
fingerprint: shards removed or changed since (taken-down data) do not come back.
A new run with ``dedup.incremental_from: OLD_RUN`` reads those back instead of re-reading,
decoding, hashing or embedding the old shards; old clusters come in as edges ("previous"), and
only edges that touch a new sample are taken from the new search. Components over both give the
clusters one run over everything would give.
"""

from __future__ import annotations

import json
import logging

from schemas.elements import Edge, Failure, SampleInfo
from transforms import fsio, shard_cache
from transforms.write import read_table

log = logging.getLogger(__name__)

PREVIOUS = "previous"


def _old_run(run_dir: str) -> dict:
    path = fsio.join(run_dir, "run.json")
    if not fsio.isfile(path) or not fsio.isdir(fsio.join(run_dir, "annotations")):
        from pipeline.config import ConfigError

        raise ConfigError(f"dedup.incremental_from: {run_dir} is not a finished run (no run.json or annotations/)")
    return json.loads(fsio.read_text(path))


def _listed_entries(run_dir: str, seen: set) -> list[str]:
    """The cache entries of the shards the old run's run.json lists (and, for an incremental old
    run, of its own reference, recursively): never other entries of its cache folder."""
    if run_dir in seen:
        return []
    seen.add(run_dir)
    run = _old_run(run_dir)
    cache_dir = (run.get("config", {}).get("run", {}) or {}).get("cache_dir") or fsio.join(run_dir, "cache")
    entries = []
    for shard in run.get("input", {}).get("shards", []):
        found = shard_cache.entries_for(cache_dir, "shards", shard)
        if not found:
            log.warning("incremental: %s is no longer what run %s read (changed or removed): left out", shard, run_dir)
            continue
        entries.append(found[0])
    earlier = (run.get("config", {}).get("dedup", {}) or {}).get("incremental_from")
    return entries + (_listed_entries(earlier, seen) if earlier else [])


def load_reference(run_dir: str) -> dict:
    """-> {"infos": [SampleInfo], "codes": [(key, bytes)], "edges": [Edge], "keys": set}."""
    from pipeline.config import ConfigError

    entries = _listed_entries(fsio.absolute(run_dir), set())
    if not entries:
        raise ConfigError(f"dedup.incremental_from: {run_dir}: no cached shard of its run.json is readable")
    infos, codes = [], []
    for folder in entries:
        tables = shard_cache.load(folder) or {}
        infos += [SampleInfo(**r) for r in tables.get("infos", [])]
        codes += [(r["key"], r["codes"]) for r in tables.get("codes", [])]
    edges = []
    for r in read_table(fsio.join(run_dir, "annotations")).to_pylist():
        if r["status"] == "ok" and (r["cluster_size"] or 1) > 1 and r["cluster_id"] != r["key"]:
            a, b = sorted((r["cluster_id"], r["key"]))
            edges.append(Edge(a, b, float(r["cluster_similarity"] or 1.0), PREVIOUS))
    failures = read_table(fsio.join(run_dir, "failures"))
    old_failures = [
        Failure(r["key"], r["shard"], r["stage"], r["error_type"], r["message"] or "", r["url"] or "")
        for r in (failures.to_pylist() if failures is not None else [])
    ]
    return {"infos": infos, "codes": codes, "edges": edges, "keys": {i.key for i in infos}, "failures": old_failures}


def touches_new(edge: Edge, old_keys: set) -> bool:
    """Old-old pairs are already in the old clusters: only edges touching a new sample count."""
    return edge.embedder == PREVIOUS or edge.key_a not in old_keys or edge.key_b not in old_keys
