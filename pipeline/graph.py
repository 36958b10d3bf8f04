"""Build the Beam graph of a webdataset job from its config; returns the named outputs.

Stages only annotate; ``Decide`` turns annotations into decisions; writers persist each table.
"""

from __future__ import annotations

import os

import apache_beam as beam

from schemas import arrow
from transforms.annotate import Annotate, annotation_row
from transforms.decide import BlocklistRows, Decide, DiversifyCaptions
from transforms.dedup import FindDuplicates
from transforms.process_shards import ProcessShards, ShardSettings, shard_path_element
from transforms.read_shards import ReadLimits
from transforms.write import WriteTable, bucket


def read_limits(cfg) -> ReadLimits:
    r = cfg.read
    return ReadLimits(
        max_image_bytes=r.max_image_bytes,
        max_caption_bytes=r.max_caption_bytes,
        require_caption=r.require_caption,
        image_extensions=tuple(r.image_extensions),
        max_members_per_key=r.max_members_per_key,
        max_json_bytes=r.max_json_bytes,
    )


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
    dec["codes"] = (dec["codes"], p | "OldCodes" >> beam.Create(ref["codes"])) | "WithOldCodes" >> beam.Flatten()
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


def add_copy_embedder(name: str, cfg, dec: dict) -> dict:
    if name == "orb":
        from transforms.orb_stage import FindOrbCopies

        return dec["orb"] | "FindOrbCopies" >> FindOrbCopies(cfg.dedup.orb)
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
    """Wire the duplicate finders that the config enables; returns FindDuplicates' outputs."""
    edges = []
    neighbours = []
    if cfg.dedup.phash.enabled:
        from transforms.phash import FindPhashCopies

        found = dec["codes"] | "FindPhashCopies" >> FindPhashCopies(cfg.dedup.phash, seed=cfg.run.seed)
        edges.append(found["edges"])
        neighbours.append(found["neighbours"])
    if cfg.dedup.clip.enabled:
        clip = add_clip(cfg, dec, out_dir)
        edges.append(clip["edges"])
        neighbours.append(clip["neighbours"])
        dec["failures"] = (dec["failures"], clip["failures"]) | "WithEmbedFailures" >> beam.Flatten()
    for name in ("orb", "sscd"):  # copy embedders that need pixels: transforms/orb_stage.py, embed_sscd.py
        if getattr(cfg.dedup, name).enabled:
            found = add_copy_embedder(name, cfg, dec)
            edges.append(found["edges"])
            neighbours.append(found["neighbours"])
    if "previous_edges" in dec:
        edges.append(dec["previous_edges"])
    inputs = {"infos": dec["infos"]}
    if edges:
        inputs["edges"] = tuple(edges) | "EmbedderEdges" >> beam.Flatten()
    out = inputs | "FindDuplicates" >> FindDuplicates(
        cfg.dedup.keeper, cfg.dedup.exact, cfg.dedup.exact_pixels, old_keys=dec.get("old_keys")
    )
    out["neighbours"] = neighbours
    return out


def build_graph(p: beam.Pipeline, cfg, shard_paths: list[str], out_dir: str) -> dict:
    """Wire the whole job; returns the PCollections of written paths and the decisions."""
    paths = p | "ShardPaths" >> beam.Create([shard_path_element(s) for s in sorted(shard_paths)])
    settings = ShardSettings(
        limits=read_limits(cfg),
        max_pixels=cfg.read.max_image_pixels,
        phash=cfg.dedup.phash.enabled,
        pixel_hash=cfg.dedup.exact and cfg.dedup.exact_pixels,
        cache_dir=(cfg.run.cache_dir or os.path.join(out_dir, "cache")) if cfg.run.cache else None,
        emit_samples=cfg.dedup.clip.enabled or cfg.dedup.sscd.enabled,
        orb=cfg.dedup.orb if cfg.dedup.orb.enabled else None,
        max_decoded_bytes=cfg.read.max_decoded_bytes,
        debug_sleep_s=cfg.run.debug_sleep_per_shard_s,
    )
    dec = paths | "ProcessShards" >> ProcessShards(settings)
    read = {"shards": dec["shards"]}
    if cfg.dedup.incremental_from:
        dec = _with_reference(p, cfg, dec)
    dec = dict(dec)
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
        probed = to_probe | "ProbeCaptions" >> ProbeCaptions(cfg.probe, cfg.run.seed, cache_dir=settings.cache_dir)
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
        lambda r, n=len(shard_paths): bucket(r["cluster_id"], n),
        lambda r: (r["cluster_id"], r["key"]),
    )
    if dup["neighbours"]:
        nn = tuple(dup["neighbours"]) | "AllNeighbours" >> beam.Flatten()
        _write(
            nn | "NeighbourRows" >> beam.Map(_neighbour_row),
            out_dir,
            "neighbours",
            lambda r, n=len(shard_paths): f"{r['embedder']}-{bucket(r['key'], n)}",
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
    _write(read["shards"], out_dir, "shards", lambda r: "all", lambda r: (r["shard"], r["path"]))
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
