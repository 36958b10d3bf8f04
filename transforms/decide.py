"""The one policy stage: annotations + thresholds -> keep / drop / diversify with reasons.

Every other stage only annotates. ``decide`` is pure so ``memsieve decide RUN_DIR`` can re-run
it over the stored annotations with other settings, without recomputing anything.

Reason codes (``reasons`` in the manifest; drop reasons come first, and a dropped sample
carries only its drop reasons):

- ``failed:<stage>:<error_type>``  the sample could not be processed (drop; keep if
  ``decide.drop_failed`` is false, so it stays off the blocklist)
- ``duplicate:<embedder>``  a non-representative member of a duplicate cluster (drop);
  embedder is exact, phash or clip
- ``memorized:probe``  the probe flags its caption (drop; diversify if
  ``decide.drop_flagged_probe`` is false)
- ``full_duplication``  its cluster's captions are (mostly) one caption: the setting that
  memorizes most (diversify)
- ``trigger:<code>``  a trigger code from the trigger stage, e.g. ``trigger:word_trigger:galaxy``
  (diversify)
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from pipeline import progress
from schemas.elements import Annotation
from transforms.diversify import DiversifyCaptions  # noqa: F401  (re-exported: pipeline.graph imports it here)

KEEP, DROP, DIVERSIFY = "keep", "drop", "diversify"
DECISIONS = (KEEP, DIVERSIFY, DROP)


def probe_flagged(a: Annotation, cfg) -> bool:
    """The probe's own flag, or the stored score against ``decide.probe_threshold``."""
    if cfg.probe_threshold is None:
        return bool(a.probe_flagged)
    return a.probe_score is not None and a.probe_score >= cfg.probe_threshold


def _drop_reasons(a: Annotation, cfg, flagged: bool) -> list[str]:
    drops = []
    duplicate = a.cluster_size > 1 and not a.is_representative
    if duplicate and cfg.drop_duplicates and a.cluster_similarity >= cfg.min_duplicate_similarity:
        drops.append(f"duplicate:{a.cluster_embedder or 'exact'}")
    if flagged and cfg.drop_flagged_probe:
        drops.append("memorized:probe")
    return drops


def _diversify_reasons(a: Annotation, cfg, flagged: bool) -> list[str]:
    notes = []
    full = a.duplication == "full" and a.cluster_size >= max(2, cfg.min_full_duplication_size)
    if full and cfg.diversify_full_duplication:
        notes.append("full_duplication")
    if cfg.diversify_triggers:
        notes.extend(f"trigger:{c}" for c in a.trigger_codes if c.split(":")[0] in cfg.trigger_kinds)
    if flagged:
        notes.append("memorized:probe")
    return notes


def decide(a: Annotation, cfg) -> tuple[str, list[str]]:
    """-> (decision, reason codes). ``cfg`` is a ``DecideConfig``."""
    if a.status != "ok":
        reason = f"failed:{a.failure_stage}:{a.failure_type}"
        return (DROP if cfg.drop_failed else KEEP), [reason]
    flagged = probe_flagged(a, cfg)
    drops = _drop_reasons(a, cfg, flagged)
    if drops:
        return DROP, drops
    notes = _diversify_reasons(a, cfg, flagged)
    return (DIVERSIFY if notes else KEEP), notes


def reason_family(code: str) -> str:
    """A reason code without its detail, for counts: ``trigger:word_trigger:galaxy`` ->
    ``trigger:word_trigger``, ``failed:decode:corrupt_image`` -> ``failed:decode``."""
    parts = code.split(":")
    return ":".join(parts[:2])


def manifest_row(a: Annotation, decision: str, reasons: list[str]) -> dict:
    return {
        "key": a.key,
        "shard": a.shard,
        "url": a.url,
        "caption": a.caption,
        "sha256": a.sha256,
        "status": a.status,
        "decision": decision,
        "reasons": list(reasons),
        "cluster_id": a.cluster_id or a.key,
        "cluster_size": int(a.cluster_size),
        "is_representative": bool(a.is_representative),
        "width": int(a.width),
        "height": int(a.height),
        "duplication": a.duplication,
        "trigger_codes": list(a.trigger_codes),
        "probe_score": a.probe_score,
    }


# blocklist categories: content drops (publish these) and samples that were never judged
CONTENT_CATEGORIES = ("duplicate", "memorized")
CATEGORIES = ("duplicate", "memorized", "dead_link", "unreadable")


def drop_category(reasons: list[str]) -> str:
    """A dropped row's category: ``duplicate`` / ``memorized`` (its content), ``dead_link`` (a
    failed download: nothing to judge) or ``unreadable`` (its bytes or caption could not be used)."""
    first = reasons[0] if reasons else ""
    if first.startswith("duplicate:"):
        return "duplicate"
    if first.startswith("memorized:"):
        return "memorized"
    if first.startswith("failed:download:"):
        return "dead_link"
    return "unreadable"


def blocklist_row(row: dict, kept: tuple[str, str] | None = None) -> dict:
    """A dropped manifest row -> its blocklist row; ``kept`` is the (key, url) of the copy its
    duplicate cluster kept."""
    category = drop_category(list(row["reasons"] or []))
    kept_key, kept_url = kept if (kept and category == "duplicate") else (None, None)
    return {
        "url": row["url"],
        "sha256": row["sha256"],
        "key": row["key"],
        "reason": ";".join(row["reasons"]),
        "category": category,
        "kept_key": kept_key,
        "kept_url": kept_url,
    }


def is_kept_copy(row: dict) -> bool:
    """The member a duplicate cluster keeps (its representative, when not dropped itself)."""
    return bool(row["is_representative"]) and (row["cluster_size"] or 1) > 1 and row["decision"] != DROP


def _categories(reasons):
    """A list<string> column of drop reasons -> ``drop_category`` of each row, vectorised."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    head = pc.list_slice(reasons, 0, 1)
    first = np.full(len(reasons), "", dtype=object)
    first[pc.list_parent_indices(head).to_numpy()] = pc.list_flatten(head).to_numpy(zero_copy_only=False)
    first = pa.array(first, pa.string())
    out = np.full(len(reasons), "unreadable", dtype=object)
    for prefix, category in (
        ("failed:download:", "dead_link"),
        ("memorized:", "memorized"),
        ("duplicate:", "duplicate"),
    ):
        out[pc.starts_with(first, prefix).to_numpy(zero_copy_only=False).astype(bool)] = category
    return pa.array(out, pa.string())


def _blocklist_columns(dropped):
    """Dropped manifest rows (a table) -> their blocklist columns (``blocklist_row``), with
    ``cluster_id`` and ``shard``; kept_key and kept_url empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reasons = dropped.column("reasons").combine_chunks()
    none = pa.nulls(dropped.num_rows, pa.string())
    return pa.table(
        {
            "url": dropped.column("url"),
            "sha256": dropped.column("sha256"),
            "key": dropped.column("key"),
            "reason": pc.fill_null(pc.binary_join(reasons, ";"), ""),
            "category": _categories(reasons),
            "kept_key": none,
            "kept_url": none,
            "cluster_id": pc.fill_null(dropped.column("cluster_id"), dropped.column("key")),
            "shard": dropped.column("shard"),
        }
    )


def _dropped(table, duplicates: bool):
    """Blockable rows (a table, or one manifest row dict) -> (the table, the blocklist columns
    of its dropped rows whose category is (``duplicates``) or is not duplicate)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(table, dict):
        table = pa.Table.from_pylist([table])
    decision = table.column("decision").to_numpy(zero_copy_only=False)
    dropped = _blocklist_columns(table.filter(pa.array(decision == DROP)))
    is_dup = pc.equal(dropped.column("category"), "duplicate").to_numpy(zero_copy_only=False).astype(bool)
    return table, dropped.filter(pa.array(is_dup if duplicates else ~is_dup))


def _needing_no_join(table) -> Iterator:
    """Blockable rows -> the blocklist table of the dropped rows that are not duplicates."""
    _, done = _dropped(table, duplicates=False)
    if done.num_rows:
        yield done


def _blockable_parts(table, n: int) -> Iterator[tuple[int, tuple[str, object]]]:
    """A shard's blockable rows (a table; or one manifest row dict) -> per hash bucket of the
    cluster id ("dropped", dropped duplicates' blocklist columns) and ("kept", (cluster_id, key,
    url) of kept copies)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.write import split_table

    table, dup = _dropped(table, duplicates=True)
    decision = table.column("decision").to_numpy(zero_copy_only=False)
    rep = table.column("is_representative").to_numpy(zero_copy_only=False).astype(bool)
    size = pc.fill_null(table.column("cluster_size"), 1).to_numpy(zero_copy_only=False)
    for b, part in split_table(dup, "cluster_id", n):
        yield b, ("dropped", part)
    kept = table.filter(pa.array(rep & (size > 1) & (decision != DROP)))
    kept = pa.table(
        {
            "cluster_id": kept.column("cluster_id"),
            "kept_key": kept.column("key"),
            "kept_url": pc.fill_null(kept.column("url"), ""),
        }
    )
    for b, part in split_table(kept, "cluster_id", n):
        yield b, ("kept", part)


def _join_kept(item) -> Iterator:
    """(bucket, [("dropped" | "kept", table)]) -> blocklist tables (with shard): each dropped
    duplicate with its cluster's kept copy (the smallest (key, url) when several)."""
    import numpy as np
    import pyarrow as pa

    _, parts = item
    by: dict[str, list] = {}
    for kind, table in parts:
        by.setdefault(kind, []).append(table)
    if "dropped" not in by:
        return
    dropped = pa.concat_tables(by["dropped"])
    if "kept" in by:
        kept = pa.concat_tables(by["kept"]).sort_by(
            [("cluster_id", "ascending"), ("kept_key", "ascending"), ("kept_url", "ascending")]
        )
        cid = kept.column("cluster_id").to_numpy(zero_copy_only=False)
        first = np.flatnonzero(np.r_[True, cid[1:] != cid[:-1]]) if len(cid) else np.zeros(0, np.int64)
        kept = kept.take(pa.array(first))
        joined = dropped.drop_columns(["kept_key", "kept_url"]).join(kept, "cluster_id", join_type="left outer")
        dropped = joined.select(dropped.column_names)
    yield dropped


class BlocklistRows(beam.PTransform):
    """Blockable manifest rows (per-shard tables of the dropped rows and kept copies, or row
    dicts) -> blocklist tables (with ``shard``); a dropped duplicate is joined to its cluster's
    kept member by cluster id (one shuffle of tables per hash bucket of the cluster id)."""

    def __init__(self, buckets: int = 1):
        super().__init__()
        self.buckets = max(1, buckets)

    def expand(self, rows):
        done = rows | "NotDuplicates" >> beam.FlatMap(_needing_no_join)  # no join: no shuffle
        joined = (
            rows
            | "BlockableParts" >> beam.FlatMap(_blockable_parts, n=self.buckets)
            | "GroupKept" >> beam.GroupByKey()
            | "JoinKept" >> beam.FlatMap(_join_kept)
        )
        return (done, joined) | "BlocklistTables" >> beam.Flatten()


class DecideFn(beam.DoFn):
    def __init__(self, cfg):
        self.cfg = cfg

    def process(self, a: Annotation) -> Iterator[dict]:
        decision, reasons = decide(a, self.cfg)
        progress.advance("decide")
        beam.metrics.Metrics.counter("decide", decision).inc()
        for r in reasons:
            beam.metrics.Metrics.counter("decide_reason", reason_family(r)).inc()
        yield manifest_row(a, decision, reasons)


class Decide(beam.PTransform):
    """Annotation -> manifest row dicts."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def expand(self, annotations):
        return annotations | "Decide" >> beam.ParDo(DecideFn(self.cfg))
