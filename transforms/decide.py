"""The one policy stage: annotations + thresholds -> keep / drop / diversify with reasons.

Every other stage only annotates. ``decide`` is pure so ``memsieve decide RUN_DIR`` can re-run
it over the stored annotations with other settings, without recomputing anything.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from schemas.elements import Annotation

KEEP, DROP, DIVERSIFY = "keep", "drop", "diversify"


def decide(a: Annotation, cfg) -> tuple[str, list[str]]:
    """-> (decision, reason codes). ``cfg`` is a ``DecideConfig``. Drop reasons come first."""
    if a.status != "ok":
        reason = f"failed:{a.failure_stage}:{a.failure_type}"
        return (DROP if cfg.drop_failed else KEEP), [reason]
    drops: list[str] = []
    if a.cluster_size > 1 and not a.is_representative and cfg.drop_duplicates:
        drops.append(f"duplicate:{a.cluster_embedder or 'exact'}")
    if a.probe_flagged and cfg.drop_flagged_probe:
        drops.append("memorized:probe")
    if drops:
        return DROP, drops
    notes: list[str] = []
    if a.cluster_size > 1 and a.duplication == "full" and cfg.diversify_full_duplication:
        notes.append("full_duplication")
    if cfg.diversify_triggers:
        notes.extend(f"trigger:{c}" for c in a.trigger_codes)
    if a.probe_flagged:
        notes.append("memorized:probe")
    return (DIVERSIFY if notes else KEEP), notes


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


def blocklist_row(row: dict) -> dict:
    return {"url": row["url"], "sha256": row["sha256"], "key": row["key"], "reason": ";".join(row["reasons"])}


class DecideFn(beam.DoFn):
    def __init__(self, cfg):
        self.cfg = cfg

    def process(self, a: Annotation) -> Iterator[dict]:
        decision, reasons = decide(a, self.cfg)
        beam.metrics.Metrics.counter("decide", decision).inc()
        for r in reasons:
            beam.metrics.Metrics.counter("decide_reason", r.split(":")[0]).inc()
        yield manifest_row(a, decision, reasons)


class Decide(beam.PTransform):
    """Annotation -> manifest row dicts."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def expand(self, annotations):
        return annotations | "Decide" >> beam.ParDo(DecideFn(self.cfg))
