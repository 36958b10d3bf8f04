"""Annotate, decide and write once per shard, on the shard's joined records (no element per row).

Everything known about a sample is either in its shard's info batches (``SampleInfo`` tables
from the reader) or sparse and already routed to its shard: failures, cluster assignments of
keys in clusters of two or more, trigger codes, probe scores, a cluster's duplication class,
and ``moved`` markers (a key repeated across shards belongs to its first shard). One
``CoGroupByKey`` on the shard brings them together; ``AnnotateShardFn`` builds the shard's
annotations as columns (``transforms.shard_columns``: no object per key), decides them over
whole columns, and writes the shard's ``annotations``, ``manifest`` and ``failures`` parts
itself. Only what later stages need leaves, as one table per shard: the blocklist's dropped and
kept rows, and, with diversification on, the diversified rows, the shard's caption-word counts
and its clustered captions.

A shard's rows are held by one worker while its parts are written: bounded by the shard's size
(a webdataset tar, a LAION metadata file), not by the input.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import progress
from schemas import arrow
from schemas.elements import Annotation, ClusterAssignment
from transforms import fsio
from transforms.decide import DECISIONS, reason_family
from transforms.decide_columns import DIVERSIFY_CODE, DROP_CODE, decide_codes, manifest_table
from transforms.shard_columns import (
    annotation_table,
    assignment_tuples,
    by_key,
    joined_annotations,
    sample_infos,
    unbatched,
)
from transforms.write import BackgroundWrites, safe_part_name

EXTRA_TAGS = ("blockable", "diversify", "words", "cluster_captions")
BLOCKABLE = ("key", "shard", "url", "sha256", "decision", "reasons", "cluster_id", "cluster_size", "is_representative")
TO_DIVERSIFY = ("key", "shard", "caption", "cluster_id")


def shard_annotations(grouped: dict) -> list[Annotation]:
    """Pure, the row path (a reference for ``annotation_table``): one shard's joined records ->
    every key's Annotation, in key order. ``grouped``: "info" (info tables), "failure" (Failure,
    written to the failures table), "late_failure" (Failure, annotation only), "assignment"
    (ClusterAssignment, or lists of them as tuples), "codes" ((key, codes)), "score" (score
    rows), "duplication" ((key, (cluster_id, class))), "moved" (keys whose first shard is another)."""
    grouped = unbatched(grouped)
    moved = set(grouped.get("moved", ()))
    infos: dict = {}
    for table in grouped.get("info", ()):
        for i in sample_infos(table):
            infos.setdefault(i.key, i)
    sparse = {
        "assignment": by_key((t[0], ClusterAssignment(*t)) for t in assignment_tuples(grouped.get("assignment", ()))),
        "codes": by_key(grouped.get("codes", ())),
        "score": by_key((r["key"], r) for r in grouped.get("score", ())),
        "duplication": by_key(grouped.get("duplication", ())),
    }
    failures = by_key((f.key, f) for f in (*grouped.get("failure", ()), *grouped.get("late_failure", ())))
    return joined_annotations(sorted((infos.keys() | failures.keys()) - moved), sparse, infos, failures)


def _failure_row(f) -> dict:
    return {
        "key": f.key,
        "shard": f.shard,
        "stage": f.stage,
        "error_type": f.error_type,
        "message": f.message,
        "url": f.url,
    }


class AnnotateShardFn(beam.DoFn):
    """(shard, joined records) -> written part paths (main); tagged EXTRA_TAGS (see module doc):
    "blockable" and "diversify" as tables of the manifest's rows (``BLOCKABLE``, ``TO_DIVERSIFY``
    columns), "words" a (word, count) table, "cluster_captions" a (cluster_id, caption) table."""

    def __init__(self, decide_cfg, out_dir: str, diversify: bool):
        self.cfg = decide_cfg
        self.out_dir = out_dir
        self.diversify = diversify
        self._writes = BackgroundWrites()

    def start_bundle(self):
        self._writes = BackgroundWrites()  # parts written while the next shard is built

    def finish_bundle(self):
        self._writes.wait()  # every part of the bundle is in place before its paths count

    def process(self, item) -> Iterator:
        shard, grouped = item
        grouped = unbatched(grouped)
        annotations = annotation_table(grouped)
        n = annotations.num_rows
        words = _words_counted(annotations) if self.diversify else None  # on a helper thread meanwhile
        # "dedup" ticks in FindDuplicates (cluster_columns.labelled, assign_tables): its own span
        decisions, reasons = decide_codes(annotations, self.cfg)  # int8 positions in DECISIONS
        self._count(decisions, reasons)
        progress.advance("decide", n)
        manifest = manifest_table(annotations, decisions, reasons)
        yield from self._write(shard, "annotations", annotations)
        yield from self._write(shard, "manifest", manifest)
        failures = sorted(grouped.get("failure", ()), key=lambda f: (f.key, f.stage, f.error_type))
        failures_table = pa.Table.from_pylist([_failure_row(f) for f in failures], schema=arrow.FAILURES)
        yield from self._write(shard, "failures", failures_table)
        kept_copy = (
            annotations.column("is_representative").to_numpy(zero_copy_only=False).astype(bool)
            & (annotations.column("cluster_size").to_numpy(zero_copy_only=False) > 1)
            & (decisions != DROP_CODE)
        )
        blockable = (decisions == DROP_CODE) | kept_copy
        if blockable.any():
            yield beam.pvalue.TaggedOutput("blockable", manifest.select(BLOCKABLE).filter(pa.array(blockable)))
        if self.diversify:
            yield from self._diversify_inputs(annotations, manifest, decisions, words.result())

    @staticmethod
    def _count(decisions: np.ndarray, reasons: pa.ListArray) -> None:
        counts = np.bincount(decisions, minlength=len(DECISIONS)).tolist()
        for name, c in sorted(zip(DECISIONS, counts, strict=True)):
            if c:
                beam.metrics.Metrics.counter("decide", name).inc(c)
        families: dict[str, int] = {}
        for r in pc.value_counts(pc.list_flatten(reasons)).to_pylist():
            family = reason_family(r["values"])
            families[family] = families.get(family, 0) + r["counts"]
        for name, c in families.items():
            beam.metrics.Metrics.counter("decide_reason", name).inc(c)

    def _diversify_inputs(self, annotations, manifest, decisions, words) -> Iterator:
        if words.num_rows:
            yield beam.pvalue.TaggedOutput("words", words)
        ok = _ok(annotations)
        caption = pc.fill_null(annotations.column("caption"), "")
        size = annotations.column("cluster_size").to_numpy(zero_copy_only=False)
        clustered = ok & (size > 1) & pc.not_equal(caption, "").to_numpy(zero_copy_only=False)
        if clustered.any():
            captions = annotations.select(["cluster_id", "caption"]).filter(pa.array(clustered))
            yield beam.pvalue.TaggedOutput("cluster_captions", captions)
        chosen = decisions == DIVERSIFY_CODE
        if chosen.any():
            yield beam.pvalue.TaggedOutput("diversify", manifest.select(TO_DIVERSIFY).filter(pa.array(chosen)))

    def _write(self, shard: str, table: str, data: pa.Table) -> Iterator[str]:
        if not data.num_rows:  # like WriteTable: a partition without rows has no part
            return
        path = fsio.join(self.out_dir, table, f"part-{safe_part_name(shard)}.parquet")
        self._writes.submit(path, data)
        beam.metrics.Metrics.counter("write", table).inc(data.num_rows)
        progress.advance("write", data.num_rows)
        yield path


def _ok(annotations) -> np.ndarray:
    return pc.fill_null(pc.equal(annotations.column("status"), "ok"), False).to_numpy(zero_copy_only=False)


def _caption_words(annotations):
    """The (word, count) table of a shard's ok captions (``caption_word_counts``)."""
    from transforms.diversify import caption_word_counts

    ok, caption = _ok(annotations), annotations.column("caption")
    return caption_word_counts(caption if ok.all() else caption.filter(pa.array(ok)))


def _words_counted(annotations):
    """``_caption_words`` started on a helper thread (Arrow and numpy work, the GIL mostly
    released) while the shard is decided and written: a future of the table."""
    from transforms.threads import pool

    return pool("shard-words", 1).submit(_caption_words, annotations)


class AnnotateShards(beam.PTransform):
    """{tag: (shard, value)} keyed PCollections (see ``shard_annotations``) -> {"written": part
    paths, "blockable", "diversify", "words", "cluster_captions"}."""

    def __init__(self, decide_cfg, out_dir: str, diversify: bool = False):
        super().__init__()
        self.decide_cfg, self.out_dir, self.diversify = decide_cfg, out_dir, diversify

    def expand(self, keyed: dict):
        from transforms.outputs import multi_output

        joined = keyed | "JoinByShard" >> beam.CoGroupByKey()
        fn = AnnotateShardFn(self.decide_cfg, self.out_dir, self.diversify)
        return multi_output(joined, "AnnotateShard", fn, list(EXTRA_TAGS), "written")


def _infos_of_keys(item) -> Iterator:
    """(shard, {"info": tables, "key": keys}) -> the SampleInfo of each listed key."""
    _, grouped = item
    wanted = set(grouped["key"])
    if not wanted:
        return
    seen = set()
    for table in grouped["info"]:
        for info in arrow.infos_of(table):
            if info.key in wanted and info.key not in seen:
                seen.add(info.key)
                yield info


class InfosOfKeys(beam.PTransform):
    """{"info": (shard, info table), "key": (shard, key)} -> the SampleInfo of those keys (a
    join per shard: only the listed keys become elements)."""

    def expand(self, keyed: dict):
        return keyed | "JoinKeysByShard" >> beam.CoGroupByKey() | "PickInfos" >> beam.FlatMap(_infos_of_keys)
