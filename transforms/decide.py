"""The one policy stage: annotations + thresholds -> keep / drop / diversify with reasons.

Every other stage only annotates. ``decide`` is pure so ``memsieve decide RUN_DIR`` can re-run
it over the stored annotations with other settings, without recomputing anything.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from schemas.elements import Annotation

KEEP, DROP, DIVERSIFY = "keep", "drop", "diversify"
# trigger codes that call for caption diversification (implicit_object:... is only recorded)
ACTED_ON_CODES = ("word_trigger", "object_trigger", "template_caption", "duplicate_caption", "near_duplicate_caption")


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
        notes.extend(f"trigger:{c}" for c in a.trigger_codes if c.split(":")[0] in ACTED_ON_CODES)
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


def _cluster_captions(item, limit: int = 20) -> tuple[str, list[str]]:
    cluster_id, captions = item
    return cluster_id, sorted({c for c in captions if c})[:limit]


def _diversify_joined(item, vocab: list[str], cfg, seed: int) -> Iterator[dict]:
    from transforms.diversify import diversify_row

    _, grouped = item
    others = next(iter(grouped["captions"]), [])
    for row in grouped["rows"]:
        out = diversify_row(row, others, vocab, cfg, seed)
        if out is not None:
            yield out


class DiversifyCaptions(beam.PTransform):
    """{"rows": manifest rows, "annotations": Annotation} -> diversify/ rows.

    MC needs the other captions of a sample's duplicate cluster: they are grouped per cluster
    (bounded) and joined by cluster id; RT and RC draw from the run's frequent caption words.
    """

    def __init__(self, cfg, seed: int):
        super().__init__()
        self.cfg = cfg
        self.seed = seed

    def expand(self, inputs):
        from transforms.diversify import vocabulary_from_counts

        annotations, rows = inputs["annotations"], inputs["rows"]
        ok = annotations | "OkCaptions" >> beam.Filter(lambda a: a.status == "ok" and bool(a.caption))
        vocab = (
            ok
            | "VocabWords" >> beam.FlatMap(lambda a: sorted({w.lower() for w in a.caption.split() if w.isalpha()}))
            | "CountVocab" >> beam.combiners.Count.PerElement()
            | "VocabList" >> beam.combiners.ToList()
            | "TopVocab" >> beam.Map(vocabulary_from_counts)
        )
        captions = (
            ok
            | "InCluster" >> beam.Filter(lambda a: a.cluster_size > 1)
            | "CaptionByCluster" >> beam.Map(lambda a: (a.cluster_id, a.caption))
            | "GroupCaptions" >> beam.GroupByKey()
            | "BoundCaptions" >> beam.Map(_cluster_captions)
        )
        chosen = rows | "ToDiversify" >> beam.Filter(lambda r: r["decision"] == DIVERSIFY)
        keyed = chosen | "ByCluster" >> beam.Map(lambda r: (r["cluster_id"], r))
        return (
            {"rows": keyed, "captions": captions}
            | "JoinCaptions" >> beam.CoGroupByKey()
            | "Diversify"
            >> beam.FlatMap(_diversify_joined, vocab=beam.pvalue.AsSingleton(vocab), cfg=self.cfg, seed=self.seed)
        )


class Decide(beam.PTransform):
    """Annotation -> manifest row dicts."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def expand(self, annotations):
        return annotations | "Decide" >> beam.ParDo(DecideFn(self.cfg))
