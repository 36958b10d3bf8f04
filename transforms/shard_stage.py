"""Annotate, decide and write once per shard, on the shard's joined records (no element per row).

Everything known about a sample is either in its shard's info batches (``SampleInfo`` tables
from the reader) or sparse and already routed to its shard: failures, cluster assignments of
keys in clusters of two or more, trigger codes, probe scores, a cluster's duplication class,
and ``moved`` markers (a key repeated across shards belongs to its first shard). One
``CoGroupByKey`` on the shard brings them together; ``AnnotateShardFn`` builds every key's
``Annotation`` in a plain loop, decides it, and writes the shard's ``annotations``,
``manifest`` and ``failures`` parts itself. Only what later stages need leaves as elements:
the blocklist's dropped and kept rows, and, with diversification on, the diversified rows, the
shard's caption-word counts and its clustered captions.

A shard's rows are held by one worker while its parts are written: bounded by the shard's size
(a webdataset tar, a LAION metadata file), not by the input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import apache_beam as beam

from pipeline import progress
from schemas import arrow
from schemas.elements import Annotation
from transforms import fsio
from transforms.annotate import annotation_row, build_annotation
from transforms.decide import DROP, decide, is_kept_copy, manifest_row, reason_family
from transforms.write import safe_part_name, write_rows

EXTRA_TAGS = ("blockable", "diversify", "words", "cluster_captions")


def _by_key(pairs: Iterable[tuple]) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def shard_annotations(grouped: dict) -> list[Annotation]:
    """Pure: one shard's joined records -> its keys' Annotations, in key order.

    ``grouped``: "info" (info tables), "failure" (Failure, written to the failures table),
    "late_failure" (Failure, annotation only), "assignment" (ClusterAssignment), "codes"
    ((key, codes)), "score" (score rows), "duplication" ((key, (cluster_id, class))), "moved"
    (keys whose first shard is another one)."""
    moved = set(grouped.get("moved", ()))
    infos: dict = {}
    for table in grouped.get("info", ()):
        for info in arrow.infos_of(table):
            infos.setdefault(info.key, info)  # a key repeated in one shard: its first record
    failures = _by_key((f.key, f) for f in (*grouped.get("failure", ()), *grouped.get("late_failure", ())))
    sparse = {
        "assignment": _by_key((a.key, a) for a in grouped.get("assignment", ())),
        "codes": _by_key(grouped.get("codes", ())),
        "score": _by_key((r["key"], r) for r in grouped.get("score", ())),
        "duplication": _by_key(grouped.get("duplication", ())),
    }
    out = []
    for key in sorted((infos.keys() | failures.keys()) - moved):
        joined = {name: values.get(key, ()) for name, values in sparse.items()}
        joined["info"] = [infos[key]] if key in infos else []
        joined["failure"] = failures.get(key, [])
        a = build_annotation(key, joined)
        if a is not None:
            out.append(a)
    return out


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
    """(shard, joined records) -> written part paths (main); tagged EXTRA_TAGS (see module doc)."""

    def __init__(self, decide_cfg, out_dir: str, diversify: bool):
        self.cfg = decide_cfg
        self.out_dir = out_dir
        self.diversify = diversify

    def process(self, item) -> Iterator:
        shard, grouped = item
        annotations = shard_annotations(grouped)
        rows = []
        decisions: Counter = Counter()
        reasons: Counter = Counter()
        for a in annotations:
            decision, why = decide(a, self.cfg)
            decisions[decision] += 1
            reasons.update(reason_family(r) for r in why)
            rows.append(manifest_row(a, decision, why))
        for name, n in decisions.items():
            beam.metrics.Metrics.counter("decide", name).inc(n)
        for name, n in reasons.items():
            beam.metrics.Metrics.counter("decide_reason", name).inc(n)
        progress.advance("decide", len(rows))
        failures = sorted(grouped.get("failure", ()), key=lambda f: (f.key, f.stage, f.error_type))
        yield from self._write(shard, "annotations", [annotation_row(a) for a in annotations])
        yield from self._write(shard, "manifest", rows)
        yield from self._write(shard, "failures", [_failure_row(f) for f in failures])
        for row in rows:
            if row["decision"] == DROP or is_kept_copy(row):
                yield beam.pvalue.TaggedOutput("blockable", row)
        if self.diversify:
            yield from self._diversify_inputs(annotations, rows)

    def _diversify_inputs(self, annotations: list[Annotation], rows: list[dict]) -> Iterator:
        from transforms.diversify import caption_words

        words: Counter = Counter()
        for a in annotations:
            if a.status == "ok" and a.caption:
                words.update(caption_words(a.caption))
                if a.cluster_size > 1:
                    yield beam.pvalue.TaggedOutput("cluster_captions", (a.cluster_id, a.caption))
        for item in sorted(words.items()):
            yield beam.pvalue.TaggedOutput("words", item)
        for row in rows:
            if row["decision"] == "diversify":
                yield beam.pvalue.TaggedOutput("diversify", row)

    def _write(self, shard: str, table: str, rows: list[dict]) -> Iterator[str]:
        if not rows:  # like WriteTable: a partition without rows has no part
            return
        path = fsio.join(self.out_dir, table, f"part-{safe_part_name(shard)}.parquet")
        write_rows(path, rows, arrow.TABLES[table])
        beam.metrics.Metrics.counter("write", table).inc(len(rows))
        progress.advance("write", len(rows))
        yield path


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
