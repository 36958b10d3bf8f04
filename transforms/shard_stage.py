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
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import progress
from schemas import arrow
from schemas.elements import Annotation, ClusterAssignment
from transforms import fsio
from transforms.annotate import build_annotation
from transforms.decide import DROP, KEEP, decide, is_kept_copy, manifest_row, reason_family
from transforms.write import safe_part_name, write_arrow

EXTRA_TAGS = ("blockable", "diversify", "words", "cluster_captions")


def _by_key(pairs: Iterable[tuple]) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def _first_per_key(tables: list) -> pa.Table | None:
    """A shard's info tables -> one table, a key repeated in the shard keeping its first record."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if pc.count_distinct(table.column("key")).as_py() == table.num_rows:
        return table
    keys = table.column("key").to_pylist()
    seen: set[str] = set()
    first = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
    return table.take(first)


def _assignments(values: Iterable) -> Iterator[ClusterAssignment]:
    """``ClusterAssignment`` elements, or lists of them as tuples (``cluster_columns.assignment_rows``)."""
    for v in values:
        if isinstance(v, ClusterAssignment):
            yield v
        else:
            for row in v:
                yield ClusterAssignment(*row)


def split_shard(grouped: dict) -> tuple[list[Annotation], pa.Table | None]:
    """Pure: one shard's joined records -> (the Annotations of its keys with any sparse record,
    in key order; the info rows of the others, "plain" keys: ok, a cluster of one, nothing else).

    ``grouped``: "info" (info tables), "failure" (Failure, written to the failures table),
    "late_failure" (Failure, annotation only), "assignment" (ClusterAssignment, or lists of
    them as tuples), "codes"
    ((key, codes)), "score" (score rows), "duplication" ((key, (cluster_id, class))), "moved"
    (keys whose first shard is another one)."""
    moved = set(grouped.get("moved", ()))
    assignments = _assignments(grouped.get("assignment", ()))
    failures = _by_key((f.key, f) for f in (*grouped.get("failure", ()), *grouped.get("late_failure", ())))
    sparse = {
        "assignment": _by_key((a.key, a) for a in assignments),
        "codes": _by_key(grouped.get("codes", ())),
        "score": _by_key((r["key"], r) for r in grouped.get("score", ())),
        "duplication": _by_key(grouped.get("duplication", ())),
    }
    rich = set(failures) | moved
    for values in sparse.values():
        rich.update(values)
    table = _first_per_key(list(grouped.get("info", ())))
    infos: dict = {}
    plain = None
    out = []
    if table is not None:
        is_rich = _is_in(table.column("key"), rich)
        rich_rows, plain = table.filter(is_rich), table.filter(pc.invert(is_rich))
        # keys with an info row and an assignment but nothing else: built from the columns
        only_clustered = set(sparse["assignment"]) - set(failures) - moved
        for name in ("codes", "score", "duplication"):
            only_clustered -= set(sparse[name])
        fast = _is_in(rich_rows.column("key"), only_clustered)
        out = _clustered_annotations(rich_rows.filter(fast), sparse["assignment"])
        infos = {i.key: i for i in arrow.infos_of(rich_rows.filter(pc.invert(fast)))}
    for key in sorted((infos.keys() | failures.keys()) - moved):
        joined = {name: values.get(key, ()) for name, values in sparse.items()}
        joined["info"] = [infos[key]] if key in infos else []
        joined["failure"] = failures.get(key, [])
        a = build_annotation(key, joined)
        if a is not None:
            out.append(a)
    return sorted(out, key=lambda a: a.key), plain


def _is_in(keys, wanted: set) -> pa.ChunkedArray:
    return pc.fill_null(pc.is_in(keys, value_set=pa.array(sorted(wanted), pa.string())), False)


INFO_FIELDS = ("key", "shard", "url", "caption", "sha256", "width", "height", "original_width", "original_height")


def _clustered_annotations(rows: pa.Table, assignments: dict) -> list[Annotation]:
    """Info rows of keys whose only record is an assignment -> their Annotations, what
    ``build_annotation`` gives them, without a ``SampleInfo`` per row."""
    if not rows.num_rows:
        return []
    cols = [rows.column(c).to_pylist() for c in INFO_FIELDS]
    out = []
    for key, shard, url, caption, sha, w, h, ow, oh in zip(*cols, strict=True):
        a = assignments[key][0]
        out.append(
            Annotation(
                key=key,
                shard=shard,
                url=url,
                caption=caption,
                sha256=sha,
                width=w,
                height=h,
                original_width=int(ow or 0),
                original_height=int(oh or 0),
                cluster_id=a.cluster_id,
                cluster_size=a.cluster_size,
                is_representative=a.is_representative,
                cluster_embedder=a.embedder,
                cluster_similarity=a.similarity,
            )
        )
    return out


def shard_annotations(grouped: dict) -> list[Annotation]:
    """Pure: one shard's joined records -> every key's Annotation, in key order."""
    rich, plain = split_shard(grouped)
    extra = [build_annotation(i.key, {"info": [i]}) for i in arrow.infos_of(plain)] if plain is not None else []
    return sorted(rich + extra, key=lambda a: a.key)


def _constant(value, n: int, type_) -> pa.Array:
    if pa.types.is_list(type_):
        offsets = np.arange(n + 1, dtype=np.int32) * len(value)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(list(value) * n, type_.value_type))
    if value is None:
        return pa.nulls(n, type_)
    return pa.array(np.full(n, value) if not isinstance(value, str) else [value] * n, type_)


def plain_table(plain: pa.Table, schema: pa.Schema, constants: dict) -> pa.Table:
    """Plain keys' info rows -> a table of ``schema``: columns named like an info column are
    copied (integers' nulls as 0), the others are ``constants``; ``cluster_id``: the key."""
    n = plain.num_rows
    columns = []
    for field in schema:
        if field.name in constants:
            columns.append(_constant(constants[field.name], n, field.type))
        elif field.name == "cluster_id":
            columns.append(plain.column("key"))
        else:
            col = plain.column(field.name)
            columns.append(pc.fill_null(col, 0).cast(field.type) if pa.types.is_integer(field.type) else col)
    return pa.Table.from_arrays(columns, schema=schema)


PLAIN = Annotation(key="", shard="")  # what a key with nothing but its info becomes
PLAIN_ANNOTATION = {
    "status": "ok",
    "failure_stage": "",
    "failure_type": "",
    "cluster_id": "",
    "cluster_size": 1,
    "is_representative": True,
    "cluster_embedder": "",
    "cluster_similarity": 1.0,
    "duplication": "",
    "trigger_codes": (),
    "probe_score": None,
    "probe_flagged": False,
}


def _annotation_column(rows: list[Annotation], field: pa.Field) -> pa.Array:
    """One column of ``annotation_row(a)`` for every Annotation."""
    values = [getattr(a, field.name) for a in rows]
    if field.name == "trigger_codes":
        values = [list(v) for v in values]
    return pa.array(values, field.type)


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
        rich, plain = split_shard(grouped)
        plain_decision, plain_reasons = decide(PLAIN, self.cfg)
        if plain is not None and (plain_decision != KEEP or plain_reasons):  # a policy that acts on plain keys
            extra = [build_annotation(i.key, {"info": [i]}) for i in arrow.infos_of(plain)]
            rich, plain = sorted(rich + extra, key=lambda a: a.key), None
        n_plain = plain.num_rows if plain is not None else 0
        # "dedup" ticks in FindDuplicates (cluster_columns.labelled, assign_tables): its own span
        rows = self._decide(rich, n_plain)
        manifest_constants = {
            "status": "ok",
            "decision": KEEP,
            "reasons": (),
            "cluster_size": 1,
            "is_representative": True,
            "duplication": "",
            "trigger_codes": (),
            "probe_score": None,
        }
        annotations = self._table("annotations", rich, plain, PLAIN_ANNOTATION)
        yield from self._write(shard, "annotations", annotations)
        yield from self._write(shard, "manifest", self._table("manifest", rows, plain, manifest_constants))
        failures = sorted(grouped.get("failure", ()), key=lambda f: (f.key, f.stage, f.error_type))
        yield from self._write(shard, "failures", self._table("failures", [_failure_row(f) for f in failures]))
        for row in rows:  # plain keys are kept and alone: never on the blocklist
            if row["decision"] == DROP or is_kept_copy(row):
                yield beam.pvalue.TaggedOutput("blockable", row)
        if self.diversify:
            yield from self._diversify_inputs(rich, rows, plain)

    def _decide(self, rich: list[Annotation], n_plain: int) -> list[dict]:
        rows = []
        decisions: Counter = Counter({KEEP: n_plain} if n_plain else {})
        reasons: Counter = Counter()
        for a in rich:
            decision, why = decide(a, self.cfg)
            decisions[decision] += 1
            reasons.update(reason_family(r) for r in why)
            rows.append(manifest_row(a, decision, why))
        for name, n in decisions.items():
            beam.metrics.Metrics.counter("decide", name).inc(n)
        for name, n in reasons.items():
            beam.metrics.Metrics.counter("decide_reason", name).inc(n)
        progress.advance("decide", len(rows) + n_plain)
        return rows

    @staticmethod
    def _table(name: str, rows: list, plain: pa.Table | None = None, constants: dict | None = None):
        """Rows (dicts, or Annotations: read column by column) [+ plain keys' rows] -> a table."""
        schema = arrow.TABLES[name]
        if rows and isinstance(rows[0], Annotation):
            table = pa.Table.from_arrays([_annotation_column(rows, f) for f in schema], schema=schema)
        else:
            table = pa.Table.from_pylist(rows, schema=schema)
        if plain is None or not plain.num_rows:
            return table
        return pa.concat_tables([table, plain_table(plain, schema, constants or {})]).sort_by("key")

    def _diversify_inputs(self, rich: list[Annotation], rows: list[dict], plain: pa.Table | None) -> Iterator:
        from transforms.diversify import caption_words

        words: Counter = Counter()
        for a in rich:
            if a.status == "ok" and a.caption:
                words.update(caption_words(a.caption))
                if a.cluster_size > 1:
                    yield beam.pvalue.TaggedOutput("cluster_captions", (a.cluster_id, a.caption))
        for caption in plain.column("caption").to_pylist() if plain is not None else ():
            if caption:
                words.update(caption_words(caption))
        for item in sorted(words.items()):
            yield beam.pvalue.TaggedOutput("words", item)
        for row in rows:
            if row["decision"] == "diversify":
                yield beam.pvalue.TaggedOutput("diversify", row)

    def _write(self, shard: str, table: str, data: pa.Table) -> Iterator[str]:
        if not data.num_rows:  # like WriteTable: a partition without rows has no part
            return
        path = fsio.join(self.out_dir, table, f"part-{safe_part_name(shard)}.parquet")
        write_arrow(path, data)
        beam.metrics.Metrics.counter("write", table).inc(data.num_rows)
        progress.advance("write", data.num_rows)
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
