"""Build the Beam graph of a job from its config and its reader's outputs.

A reader per input layout (``READERS``: webdataset shards, LAION precomputed embeddings) emits the
same elements: ``SampleInfo``, ``Failure``, shard-table rows and, where the layout has them,
perceptual-hash codes, samples with pixels, or batches of embedding vectors. Everything after the
reader is shared: stages only annotate; ``Decide`` turns annotations into decisions; writers
persist each table.
"""

from __future__ import annotations

import importlib
import os

import apache_beam as beam

from schemas import arrow
from transforms.annotate import Annotate, annotation_row
from transforms.decide import BlocklistRows, Decide, DiversifyCaptions
from transforms.dedup import FindDuplicates
from transforms.write import WriteTable, bucket

# input format -> reader module: check(cfg) and read(p, cfg, inputs, out_dir) -> dict
READERS = {
    "webdataset": "transforms.read_webdataset",
    "laion_embeddings": "transforms.read_laion",
}


def reader(fmt: str):
    from pipeline.config import ConfigError

    if fmt not in READERS:
        raise ConfigError(f"input.format: no reader for {fmt!r} (known: {', '.join(sorted(READERS))})")
    return importlib.import_module(READERS[fmt])


def read_input(p: beam.Pipeline, cfg, fmt: str, inputs: list[str], out_dir: str) -> dict:
    """The layout's reader -> {"infos": SampleInfo, "failures": Failure, "shards": table rows,
    optional "codes": (key, bytes), "samples": Sample (pixels), "vectors": {embedder: (keys,
    ndarray) batches}; "pixels": bool, "input": the run.json description}."""
    return reader(fmt).read(p, cfg, inputs, out_dir)


def _failure_row(f) -> dict:
    return {
        "key": f.key,
        "shard": f.shard,
        "stage": f.stage,
        "error_type": f.error_type,
        "message": f.message,
        "url": f.url,
    }


def _by_shard(row: dict) -> str:
    return row["shard"]


def _cluster_rows(a) -> list[dict]:
    if a.cluster_size < 2:
        return []
    return [
        {
            "key": a.key,
            "cluster_id": a.cluster_id,
            "embedder": a.embedder or "exact",
            "similarity": a.similarity,
            "cluster_size": a.cluster_size,
            "is_representative": a.is_representative,
        }
    ]


def _with_reference(p, cfg, dec: dict) -> dict:
    """Incremental mode: the old run's samples and codes join the new ones (not recomputed)."""
    from transforms.incremental import load_reference

    ref = load_reference(cfg.dedup.incremental_from)
    dec = dict(dec)
    dec["infos"] = (dec["infos"], p | "OldInfos" >> beam.Create(ref["infos"])) | "WithOldInfos" >> beam.Flatten()
    old_codes = p | "OldCodes" >> beam.Create(ref["codes"])
    dec["codes"] = (dec["codes"], old_codes) | "WithOldCodes" >> beam.Flatten() if "codes" in dec else old_codes
    dec["previous_edges"] = p | "OldClusters" >> beam.Create(ref["edges"])
    old_failures = p | "OldFailures" >> beam.Create(ref["failures"])
    dec["failures"] = (dec["failures"], old_failures) | "WithOldFailures" >> beam.Flatten()
    dec["old_keys"] = ref["keys"]
    return dec


def add_clip(cfg, dec: dict, out_dir: str) -> dict:
    """CLIP image embeddings (persisted per shard) -> semantic-duplicate edges at clip.threshold."""
    from transforms.ann_edges import VectorEdges
    from transforms.embed_clip import EmbedClip

    emb_dir = cfg.dedup.embeddings_dir or os.path.join(out_dir, "embeddings")
    emb = dec["samples"] | "EmbedClip" >> EmbedClip(cfg.dedup.clip, cfg.read.max_image_pixels, embeddings_dir=emb_dir)
    found = emb["embeddings"] | "ClipEdges" >> VectorEdges(
        cfg.dedup.clip.threshold, "clip", cfg.dedup.cluster, cfg.run.seed
    )
    embed_failures = emb["failures"] | "OnlyModelFailures" >> beam.Filter(
        lambda f: f.error_type not in DECODE_ERROR_TYPES
    )
    return {"edges": found["edges"], "neighbours": found["neighbours"], "failures": embed_failures}


def add_copy_embedder(name: str, cfg, dec: dict, hash_edges=None) -> dict:
    if name == "orb":
        from transforms.orb_stage import FindOrbCopies

        return dec["orb"] | "FindOrbCopies" >> FindOrbCopies(cfg.dedup.orb, hash_edges)
    from transforms.embed_sscd import SscdCopies

    return dec["samples"] | "SscdCopies" >> SscdCopies(
        cfg.dedup.sscd, cfg.dedup.cluster, cfg.read.max_image_pixels, cfg.run.seed
    )


DECODE_ERROR_TYPES = (
    "corrupt_image",
    "unidentified_image",
    "format_mismatch",
    "decompression_bomb",
    "unsupported_image_format",
    "bad_dimensions",
    "empty_image",
)


def add_dedup(cfg, dec: dict, out_dir: str = "") -> dict:
    """Wire the duplicate finders that the config and the reader's layout allow; returns
    FindDuplicates' outputs plus the embedders' nearest-neighbour PCollections."""
    from transforms.ann_edges import VectorEdges

    edges = []
    neighbours = []
    hash_edges = None
    if cfg.dedup.phash.enabled and "codes" in dec:
        from transforms.phash import FindPhashCopies

        found = dec["codes"] | "FindPhashCopies" >> FindPhashCopies(cfg.dedup.phash, seed=cfg.run.seed)
        hash_edges = found["edges"]
        edges.append(found["edges"])
        neighbours.append(found["neighbours"])
    if cfg.dedup.clip.enabled and "samples" in dec:
        clip = add_clip(cfg, dec, out_dir)
        edges.append(clip["edges"])
        neighbours.append(clip["neighbours"])
        dec["failures"] = (dec["failures"], clip["failures"]) | "WithEmbedFailures" >> beam.Flatten()
    for name in ("orb", "sscd"):  # copy embedders that need pixels: transforms/orb_stage.py, embed_sscd.py
        if getattr(cfg.dedup, name).enabled and dec.get("pixels"):
            found = add_copy_embedder(name, cfg, dec, hash_edges)
            edges.append(found["edges"])
            neighbours.append(found["neighbours"])
    for embedder, batches in sorted(dec.get("vectors", {}).items()):  # precomputed embeddings
        found = batches | f"VectorEdges_{embedder}" >> VectorEdges(
            cfg.dedup.cluster.threshold, embedder, cfg.dedup.cluster, cfg.run.seed
        )
        edges.append(found["edges"])
        neighbours.append(found["neighbours"])
    if "previous_edges" in dec:
        edges.append(dec["previous_edges"])
    inputs = {"infos": dec["infos"]}
    if edges:
        inputs["edges"] = tuple(edges) | "EmbedderEdges" >> beam.Flatten()
    out = inputs | "FindDuplicates" >> FindDuplicates(
        cfg.dedup.keeper,
        cfg.dedup.exact,
        cfg.dedup.exact_pixels and dec.get("pixels", True),
        old_keys=dec.get("old_keys"),
    )
    out["neighbours"] = neighbours
    return out


def build_graph(p: beam.Pipeline, cfg, read: dict, out_dir: str) -> dict:
    """Wire the whole job after the reader (``read_input``'s dict); returns the PCollections of
    the annotations and the manifest rows."""
    shards = read["shards"]
    n_parts = max(1, read["input"]["n_shards"])  # clusters/ and neighbours/ parts, as many as input shards
    cache_dir = (cfg.run.cache_dir or os.path.join(out_dir, "cache")) if cfg.run.cache else None
    dec = dict(read)
    if cfg.dedup.incremental_from:
        dec = _with_reference(p, cfg, dec)
    dup = add_dedup(cfg, dec, out_dir)
    failures = dec["failures"]

    keyed = {
        "info": dec["infos"] | "KeyInfo" >> beam.Map(lambda i: (i.key, i)),
        "failure": failures | "KeyFailure" >> beam.Map(lambda f: (f.key, f)),
        "assignment": dup["assignments"] | "KeyAssignment" >> beam.Map(lambda a: (a.key, a)),
    }
    duplication = None
    if cfg.triggers.enabled:
        from transforms.triggers import MineTriggers

        mined = {"infos": dec["infos"], "assignments": dup["assignments"]} | "MineTriggers" >> MineTriggers(
            cfg.triggers
        )
        keyed["codes"] = mined["codes"]
        duplication = mined["duplication"] | "DuplicationClass" >> beam.Map(lambda kv: (kv[0], kv[1]["class"]))
        _write(
            mined["keywords"],
            out_dir,
            "triggers/keywords",
            lambda r: "all",
            lambda r: (-r["npmi"], r["keyword"], r["cluster_id"]),
        )
        _write(
            mined["objects"],
            out_dir,
            "triggers/objects",
            lambda r: "all",
            lambda r: (r["q_value"], r["keyword"], r["object"]),
        )
    if cfg.probe.enabled:
        from transforms.probe_stage import ProbeCaptions

        to_probe = dec["infos"]
        if cfg.probe.budget == "cluster_representatives":
            reps = (
                dup["assignments"]
                | "Representatives" >> beam.Filter(lambda a: a.cluster_size > 1 and a.is_representative)
                | "RepKeys" >> beam.Map(lambda a: (a.key, 1))
            )
            to_probe = (
                {"i": keyed["info"], "r": reps}
                | "JoinReps" >> beam.CoGroupByKey()
                | "RepInfos" >> beam.FlatMap(lambda kv: list(kv[1]["i"])[:1] if list(kv[1]["r"]) else [])
            )
        probed = to_probe | "ProbeCaptions" >> ProbeCaptions(cfg.probe, cfg.run.seed, cache_dir=cache_dir)
        keyed["score"] = probed["scores"] | "KeyScore" >> beam.Map(lambda r: (r["key"], r))
        keyed["failure"] = (
            keyed["failure"],
            probed["failures"] | "KeyProbeFailure" >> beam.Map(lambda f: (f.key, f)),
        ) | "WithProbeFailures" >> beam.Flatten()
        shard_of = keyed["info"] | "ShardOf" >> beam.Map(lambda kv: (kv[0], kv[1].shard))
        score_rows = (
            {"s": keyed["score"], "shard": shard_of}
            | "JoinScoreShard" >> beam.CoGroupByKey()
            | "ScoreRows" >> beam.FlatMap(_score_rows)
        )
        _write(score_rows, out_dir, "scores", lambda r: r["_shard"], lambda r: (r["key"],))

    annotations = keyed | "Annotate" >> Annotate(duplication)
    rows = annotations | "Decide" >> Decide(cfg.decide)
    outputs = {"annotations": annotations, "manifest": rows}
    _write(
        annotations | "AnnotationRows" >> beam.Map(annotation_row),
        out_dir,
        "annotations",
        _by_shard,
        lambda r: (r["key"],),
    )
    _write(rows, out_dir, "manifest", _by_shard, lambda r: (r["key"],))
    _write(
        failures | "FailureRows" >> beam.Map(_failure_row),
        out_dir,
        "failures",
        _by_shard,
        lambda r: (r["key"], r["stage"], r["error_type"]),
    )
    _write(
        dup["assignments"] | "ClusterRows" >> beam.FlatMap(_cluster_rows),
        out_dir,
        "clusters",
        lambda r, n=n_parts: bucket(r["cluster_id"], n),
        lambda r: (r["cluster_id"], r["key"]),
    )
    if dup["neighbours"]:
        nn = tuple(dup["neighbours"]) | "AllNeighbours" >> beam.Flatten()
        _write(
            nn | "NeighbourRows" >> beam.Map(_neighbour_row),
            out_dir,
            "neighbours",
            lambda r, n=n_parts: f"{r['embedder']}-{bucket(r['key'], n)}",
            lambda r: (r["key"],),
        )
    if cfg.diversify.enabled:
        div = {"rows": rows, "annotations": annotations} | "DiversifyCaptions" >> DiversifyCaptions(
            cfg.diversify, cfg.run.seed
        )
        _write(div, out_dir, "diversify", _by_shard, lambda r: (r["key"],))
    _write(
        rows | "BlockRows" >> BlocklistRows(),
        out_dir,
        "blocklist",
        lambda r: r["_shard"],
        lambda r: (r["key"],),
    )
    _write(shards, out_dir, "shards", lambda r: "all", lambda r: (r["shard"], r["path"]))
    _join_sinks(p)
    return outputs


def _score_rows(item) -> list[dict]:
    _, grouped = item
    shards = list(grouped["shard"])
    return [dict(r, _shard=shards[0] if shards else "unknown") for r in grouped["s"]]


def _neighbour_row(n) -> dict:
    return {"key": n.key, "embedder": n.embedder, "nn_key": n.nn_key, "nn_similarity": float(n.nn_similarity)}


def _write(pcoll, out_dir: str, table: str, partition, sort_key):
    label = table.replace("/", "_")
    written = pcoll | f"Write_{label}" >> WriteTable(
        os.path.join(out_dir, table), arrow.TABLES[table], partition, sort_key
    )
    pcoll.pipeline.__dict__.setdefault("_memsieve_written", []).append(written)
    return written


def _join_sinks(p: beam.Pipeline):
    """One last step that depends on every writer. Beam 2.77's DaskRunner computes only the
    graph's last transform, so a pipeline with several sinks must end in one that needs them all."""
    written = p.__dict__.get("_memsieve_written", [])
    return tuple(written) | "AllWritten" >> beam.Flatten() | "CountWritten" >> beam.combiners.Count.Globally()
