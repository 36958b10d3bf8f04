"""Join everything known about a key into one ``Annotation`` (the policy stage's only input)."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from schemas.elements import Annotation, ClusterAssignment, Failure, SampleInfo


def build_annotation(key: str, grouped: dict, duplication: dict[str, str] | None = None) -> Annotation | None:
    """Pure: the joined lists for one key -> an Annotation (None when the key has no record).

    A cluster's duplication class comes from ``grouped["duplication"]`` ((cluster_id, class)
    pairs joined to this key) or, for direct callers, the ``duplication`` dict."""
    infos: list[SampleInfo] = sorted(grouped.get("info", []), key=lambda i: i.shard)
    failures: list[Failure] = sorted(grouped.get("failure", []), key=lambda f: (f.shard, f.stage, f.error_type))
    assignments: list[ClusterAssignment] = list(grouped.get("assignment", []))
    codes = sorted({c for codes in grouped.get("codes", []) for c in codes})
    scores = list(grouped.get("score", []))
    duplication = {**(duplication or {}), **dict(grouped.get("duplication", []))}
    if infos:
        i = infos[0]
        fields: dict = dict(
            shard=i.shard,
            url=i.url,
            caption=i.caption,
            sha256=i.sha256,
            width=i.width,
            height=i.height,
            original_width=int(i.original_width or 0),
            original_height=int(i.original_height or 0),
        )
        late = [f for f in failures if f.shard == i.shard and f.stage not in ("read", "download", "decode")]
        if late:  # a later stage (embed, probe) could not process it
            f = late[0]
            fields.update(status="failed", failure_stage=f.stage, failure_type=f.error_type)
    elif failures:
        f = failures[0]
        fields = dict(
            shard=f.shard,
            url=f.url,
            caption=f.caption,
            sha256=f.sha256,
            status="failed",
            failure_stage=f.stage,
            failure_type=f.error_type,
        )
    else:
        return None
    fields["trigger_codes"] = tuple(codes)
    if assignments and fields.get("status", "ok") == "ok":
        a = assignments[0]
        fields.update(
            cluster_id=a.cluster_id,
            cluster_size=a.cluster_size,
            is_representative=a.is_representative,
            cluster_embedder=a.embedder,
            cluster_similarity=a.similarity,
            duplication=duplication.get(a.cluster_id, "") if a.cluster_size > 1 else "",
        )
    if scores:
        s = scores[0]
        fields.update(probe_score=float(s["score"]), probe_flagged=bool(s.get("flagged")))
    return Annotation(key=key, **fields)


ANNOTATION_FIELDS = tuple(Annotation.__dataclass_fields__)


def annotation_row(a: Annotation) -> dict:
    row = {name: getattr(a, name) for name in ANNOTATION_FIELDS}  # flat fields: no deep copy (asdict)
    row["trigger_codes"] = list(a.trigger_codes)
    return row


def annotation_from_row(row: dict) -> Annotation:
    fields = dict(row)
    fields["trigger_codes"] = tuple(fields.get("trigger_codes") or ())
    known = set(Annotation.__dataclass_fields__)
    cleaned = {k: v for k, v in fields.items() if k in known}
    for name, default in (
        ("original_width", 0),
        ("original_height", 0),
        ("url", ""),
        ("caption", ""),
        ("sha256", ""),
        ("cluster_id", ""),
        ("duplication", ""),
        ("failure_stage", ""),
        ("failure_type", ""),
        ("cluster_embedder", ""),
    ):
        if cleaned.get(name) is None:
            cleaned[name] = default
    return Annotation(**cleaned)


def _emit(item) -> Iterator[Annotation]:
    key, grouped = item
    a = build_annotation(key, grouped)
    if a is not None:
        yield a


def _cluster_members(kv) -> Iterator[tuple[str, str]]:
    _, a = kv
    if a.cluster_size > 1:
        yield a.cluster_id, a.key


def _class_to_members(item) -> Iterator[tuple[str, tuple[str, str]]]:
    """(cluster_id, {"cls": [class], "key": member keys}) -> (key, (cluster_id, class)) per member."""
    cluster_id, grouped = item
    classes = list(grouped["cls"])
    if not classes:
        return
    for key in grouped["key"]:
        yield key, (cluster_id, classes[0])


class Annotate(beam.PTransform):
    """{"info", "failure", "assignment", "codes", "score"} keyed PCollections -> Annotation.

    ``duplication`` ((cluster_id, full|partial), one per duplicate cluster) joins by key, not
    as a side input: a ``CoGroupByKey`` on cluster_id hands each member key of the cluster its
    class, then the per-key ``CoGroupByKey`` joins it with the rest. Nothing here grows with the
    number of samples in one element or one worker's memory beyond a single cluster's keys.
    """

    def __init__(self, duplication=None):
        super().__init__()
        self.duplication = duplication

    def expand(self, keyed: dict):
        keyed = dict(keyed)
        if self.duplication is not None and "assignment" in keyed:
            members = keyed["assignment"] | "ClusterMembers" >> beam.FlatMap(_cluster_members)
            keyed["duplication"] = (
                {"cls": self.duplication, "key": members}
                | "JoinDuplication" >> beam.CoGroupByKey()
                | "DuplicationByKey" >> beam.FlatMap(_class_to_members)
            )
        joined = keyed | "JoinByKey" >> beam.CoGroupByKey()
        return joined | "Build" >> beam.FlatMap(_emit)
