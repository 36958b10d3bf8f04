"""Build the Beam graph of a job from its config and its reader's outputs.

A reader per input layout (``READERS``: webdataset shards, LAION precomputed embeddings) emits the
same elements: ``SampleInfo`` tables (one per shard or reader batch, never one element per
sample), ``Failure``, ``moved`` markers of keys repeated across shards, shard-table rows and,
where the layout has them, perceptual-hash codes, samples with pixels, or batches of embedding
vectors. Everything after the reader is shared: stages only annotate; the per-shard stage
(``transforms.shard_stage``) builds each shard's annotations, decides them and writes them.
"""

from __future__ import annotations

import importlib
import os

import apache_beam as beam

from schemas import arrow
from transforms.assignment_tables import (
    assignment_rows,
    assignment_shards,
    cluster_table,
    representatives,
)
from transforms.decide import BlocklistRows, DiversifyCaptions
from transforms.dedup import FindDuplicates
from transforms.write import WriteBatches, WriteTable, bucket, bucket_labels, buckets

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
    """The layout's reader -> {"info_batches": SampleInfo tables, "failures": Failure, "moved":
    (shard, key), "shards": table rows, "buckets": int, optional "codes": (key, bytes), "samples":
    Sample (pixels), "vectors": {embedder: (keys, ndarray) batches}; "pixels": bool, "input": the
    run.json description}."""
    return reader(fmt).read(p, cfg, inputs, out_dir)


def _with_reference(p, cfg, dec: dict) -> dict:
    """Incremental mode: the old run's samples and codes join the new ones (not recomputed)."""
    from transforms.incremental import load_reference

    ref = load_reference(cfg.dedup.incremental_from)
    dec = dict(dec)
    by_shard: dict[str, list] = {}
    for info in ref["infos"]:
        by_shard.setdefault(info.shard, []).append(info)
    old_tables = [arrow.info_table(infos) for _, infos in sorted(by_shard.items())]
    old = p | "OldInfos" >> beam.Create(old_tables)
    dec["info_batches"] = (dec["info_batches"], old) | "WithOldInfos" >> beam.Flatten()
    old_codes = p | "OldCodes" >> beam.Create(ref["codes"])
    dec["codes"] = (dec["codes"], old_codes) | "WithOldCodes" >> beam.Flatten() if "codes" in dec else old_codes
    dec["previous_edges"] = p | "OldClusters" >> beam.Create(ref["edges"])
    old_failures = p | "OldFailures" >> beam.Create(ref["failures"])
    dec["failures"] = (dec["failures"], old_failures) | "WithOldFailures" >> beam.Flatten()
    dec["old_keys"] = ref["keys"]
    return dec


def add_clip(cfg, dec: dict, out_dir: str) -> dict:
    """CLIP image embeddings (persisted per shard) -> semantic-duplicate edges at clip.threshold."""
    from transforms import spill
    from transforms.ann_edges import VectorEdges
    from transforms.embed_clip import EmbedClip

    emb_dir = cfg.dedup.embeddings_dir or os.path.join(out_dir, "embeddings")
    emb = dec["samples"] | "EmbedClip" >> EmbedClip(cfg.dedup.clip, cfg.read.max_image_pixels, embeddings_dir=emb_dir)
    found = emb["embeddings"] | "ClipEdges" >> VectorEdges(
        cfg.dedup.clip.threshold, "clip", cfg.dedup.cluster, cfg.run.seed, spill=spill.folder_of(out_dir, "clip")
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
    FindDuplicates' outputs plus the embedders' nearest-neighbour PCollections. Vectors are
    spilled to files under ``out_dir`` (``transforms.spill``; none without an ``out_dir``)."""
    from transforms import spill
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
            cfg.dedup.cluster.threshold,
            embedder,
            cfg.dedup.cluster,
            cfg.run.seed,
            batched_neighbours=True,
            batched_edges=True,
            spill=spill.folder_of(out_dir, f"vectors-{embedder}"),
        )
        edges.append(found["edges"])  # EdgeBatch columns, one per search group
        neighbours.append(found["neighbours"])
    if "previous_edges" in dec:
        edges.append(dec["previous_edges"])
    inputs = {"info_batches": dec["info_batches"]}
    if edges:
        inputs["edges"] = tuple(edges) | "EmbedderEdges" >> beam.Flatten()
    out = inputs | "FindDuplicates" >> FindDuplicates(
        cfg.dedup.keeper,
        cfg.dedup.exact,
        cfg.dedup.exact_pixels and dec.get("pixels", True),
        old_keys=dec.get("old_keys"),
        buckets=dec.get("buckets", 16),
        per_key=False,  # assignments travel as tables; build_graph derives elements where needed
    )
    out["neighbours"] = neighbours
    return out


def add_triggers(cfg, dec: dict, keyed: dict, tables, out_dir: str) -> None:
    from transforms.triggers import MineTriggers

    rows = tables | "AssignmentRows" >> beam.FlatMap(assignment_rows)  # (shard, [tuples]): no element per key
    mined = {"info_batches": dec["info_batches"], "assignment_rows": rows} | "MineTriggers" >> MineTriggers(
        cfg.triggers, buckets=dec.get("buckets", 16)
    )
    keyed["codes"] = mined["codes"]  # (shard, Batch of (key, codes)): no element per coded key
    keyed["duplication"] = mined["duplication_rows"]  # (shard, Batch of (key, (cluster id, class)))
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


def add_probe(cfg, dec: dict, keyed: dict, tables, out_dir: str, cache_dir: str | None) -> None:
    from transforms.probe_stage import ProbeCaptions
    from transforms.shard_stage import InfosOfKeys

    if cfg.probe.budget == "cluster_representatives":
        reps = tables | "Representatives" >> beam.FlatMap(representatives)
        to_probe = {"info": keyed["info"], "key": reps} | "RepInfos" >> InfosOfKeys()
    else:
        to_probe = dec["info_batches"]  # the probe groups them by shard
    probed = to_probe | "ProbeCaptions" >> ProbeCaptions(cfg.probe, cfg.run.seed, cache_dir=cache_dir)
    keyed["score"] = probed["scores"] | "ScoreByShard" >> beam.Map(lambda r: (r["_shard"], r))
    keyed["late_failure"] = probed["failures"] | "ProbeFailureByShard" >> beam.Map(lambda f: (f.shard, f))
    _write(probed["scores"], out_dir, "scores", lambda r: r["_shard"], lambda r: (r["key"],))


def build_graph(p: beam.Pipeline, cfg, read: dict, out_dir: str) -> dict:
    """Wire the whole job after the reader (``read_input``'s dict); returns the written part
    paths of the per-shard stage and the cluster assignments.

    Annotate, Decide and the per-sample writers run once per shard (``AnnotateShards``) on the
    shard's info batches joined with what is sparse and routed to the shard: failures, the
    assignments of clustered keys, trigger codes, probe scores, duplication classes."""
    from transforms.shard_columns import info_for_annotations
    from transforms.shard_stage import AnnotateShards

    n_parts = max(1, read["input"]["n_shards"])  # clusters/ and neighbours/ parts, as many as input shards
    cache_dir = (cfg.run.cache_dir or os.path.join(out_dir, "cache")) if cfg.run.cache else None
    dec = dict(read)
    if cfg.dedup.incremental_from:
        dec = _with_reference(p, cfg, dec)
    dup = add_dedup(cfg, dec, out_dir)
    tables = dup["assignment_tables"]
    keyed = {
        "info": dec["info_batches"] | "InfoByShard" >> beam.Map(lambda t: (arrow.batch_shard(t), t)),
        "failure": dec["failures"] | "FailureByShard" >> beam.Map(lambda f: (f.shard, f)),
        "assignment": tables | "AssignmentByShard" >> beam.FlatMap(assignment_shards),  # (shard, table)
    }
    if "moved" in dec:
        keyed["moved"] = dec["moved"]
    if cfg.triggers.enabled:
        add_triggers(cfg, dec, keyed, tables, out_dir)
    if cfg.probe.enabled:
        add_probe(cfg, dec, keyed, tables, out_dir, cache_dir)
    keyed["info"] = keyed["info"] | "AnnotateInfo" >> beam.Map(lambda kv: (kv[0], info_for_annotations(kv[1])))
    staged = keyed | "AnnotateShards" >> AnnotateShards(cfg.decide, out_dir, cfg.diversify.enabled)
    p.__dict__.setdefault("_memsieve_written", []).append(staged["written"])
    clusters = tables | "ClusterRows" >> beam.Map(cluster_table)
    _write_tables(
        clusters, out_dir, "clusters", lambda t, n=n_parts: bucket_labels(t["cluster_id"], n), ("cluster_id", "key")
    )
    if dup["neighbours"]:
        nn = tuple(dup["neighbours"]) | "AllNeighbours" >> beam.Flatten()
        written = (
            nn
            | "NeighbourRows" >> beam.Map(_neighbour_rows)
            | "Write_neighbours"
            >> WriteBatches(
                os.path.join(out_dir, "neighbours"),
                arrow.TABLES["neighbours"],
                lambda r, n=n_parts: f"{r['embedder']}-{bucket(r['key'], n)}",
                lambda r: (r["key"],),
                table_partition=lambda t, n=n_parts: _neighbour_parts(t, n),
                sort_columns=("key",),
            )
        )
        p.__dict__.setdefault("_memsieve_written", []).append(written)
    from pipeline.report_stage import add_report_parts

    report = add_report_parts(p, cfg, read, out_dir)  # the report's tables part, beside diversification
    if report is not None:
        p.__dict__["_memsieve_written"].append(report)
    if cfg.diversify.enabled:
        div = {
            "rows": staged["diversify"],
            "words": staged["words"],
            "captions": staged["cluster_captions"],
        } | "DiversifyCaptions" >> DiversifyCaptions(cfg.diversify, cfg.run.seed, dec.get("buckets", 1))
        _write_tables(div, out_dir, "diversify", _shard_labels, ("key",))
    blocked = staged["blockable"] | "BlockRows" >> BlocklistRows(dec.get("buckets", 1))
    blocklist = _write_tables(blocked, out_dir, "blocklist", _shard_labels, ("key",))
    from pipeline.blocklist import add_blocklist_files  # blocklist.txt, .tsv and .json beside diversification

    p.__dict__["_memsieve_written"].append(add_blocklist_files(blocklist, out_dir))
    _write(read["shards"], out_dir, "shards", lambda r: "all", lambda r: (r["shard"], r["path"]))
    _join_sinks(p)
    return {"written": staged["written"], "assignment_tables": tables}


def _neighbour_rows(n):
    """A Neighbour, or a list of them -> table rows; a pyarrow Table (a search group's,
    ``batched_neighbours``) stays as it is."""
    if hasattr(n, "num_rows"):
        return n
    return [
        {"key": x.key, "embedder": x.embedder, "nn_key": x.nn_key, "nn_similarity": float(x.nn_similarity)}
        for x in (n if isinstance(n, list) else [n])
    ]


def _neighbour_parts(table, n: int):
    """The neighbours writer's partition of each row of a Table (as a row's partition)."""
    import numpy as np
    import pyarrow.compute as pc

    embedders = pc.unique(table["embedder"]).to_pylist()
    if len(embedders) == 1:  # a search group's table: one embedder, no string built per row
        n = max(1, int(n))
        names = np.array([f"{embedders[0]}-{i:0{len(str(n - 1))}d}" for i in range(n)], dtype=object)
        return names[buckets(table["key"], n)]
    embedder = table["embedder"].to_numpy(zero_copy_only=False).astype(object)
    return embedder + np.array("-", dtype=object) + bucket_labels(table["key"], n)


def _shard_labels(table):
    return table["shard"]  # an Arrow column: the writer encodes it without a string per row


def _write_tables(pcoll, out_dir: str, table: str, table_partition, sort_columns: tuple[str, ...]):
    """Tables of a table's rows (more columns allowed) -> its parts, partitioned per row by
    ``table_partition`` and sorted by ``sort_columns`` (``WriteBatches``)."""
    label = table.replace("/", "_")
    written = pcoll | f"Write_{label}" >> WriteBatches(
        os.path.join(out_dir, table),
        arrow.TABLES[table],
        lambda r: "all",
        lambda r: tuple(r[c] for c in sort_columns),
        table_partition=table_partition,
        sort_columns=sort_columns,
    )
    pcoll.pipeline.__dict__.setdefault("_memsieve_written", []).append(written)
    return written


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
