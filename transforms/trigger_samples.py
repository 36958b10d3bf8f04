"""MineTriggers' records from per-sample ``SampleInfo`` elements and ``ClusterAssignment``
elements (the per-sample path; readers give info tables, ``transforms.trigger_records``)."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from pipeline import progress
from transforms.keywords import KeywordExtractor, normalize_caption
from transforms.objects import metadata_objects
from transforms.trigger_records import CHUNK, RecordBatch


def sample_records(inputs: dict, bigrams: bool, use_metadata: bool):
    """{"infos", "assignments"} -> record batches (<= CHUNK records of one shard each)."""
    keyed_i = inputs["infos"] | "KeyInfos" >> beam.Map(lambda i: (i.key, i))
    keyed_a = inputs["assignments"] | "KeyAssign" >> beam.Map(lambda a: (a.key, a))
    return (
        {"i": keyed_i, "a": keyed_a}
        | "JoinSample" >> beam.CoGroupByKey()
        | "Records" >> beam.ParDo(SampleRecords(bigrams, use_metadata))
        | "ByShard" >> beam.Map(lambda r: (r["shard"], r))
        | "GroupShard" >> beam.GroupByKey()
        | "Batches" >> beam.FlatMap(chunks)
    )


class SampleRecords(beam.DoFn):
    """(key, {"i": [SampleInfo], "a": [ClusterAssignment]}) -> one record dict per ok sample
    (the per-sample path of ``SampleInfo`` elements; ``chunks`` makes them batches)."""

    def __init__(self, bigrams: bool, use_metadata: bool):
        self.bigrams = bigrams
        self.use_metadata = use_metadata

    def setup(self):
        self.extractor = KeywordExtractor(self.bigrams)

    def process(self, item) -> Iterator[dict]:
        key, grouped = item
        infos = sorted(grouped["i"], key=lambda i: i.shard)
        if not infos:
            return
        info, assignments = infos[0], list(grouped["a"])
        a = assignments[0] if assignments else None
        progress.advance("triggers")
        yield {
            "key": key,
            "shard": info.shard,
            "caption": info.caption,
            "norm": normalize_caption(info.caption),
            "terms": self.extractor.terms_tuple(info.caption),
            "objects": metadata_objects(info.meta_json) if self.use_metadata else [],
            "cluster_id": a.cluster_id if a else key,
            "cluster_size": a.cluster_size if a else 1,
        }


def chunks(item) -> Iterator[RecordBatch]:
    _, records = item
    records = sorted(records, key=lambda r: r["key"])
    for i in range(0, len(records), CHUNK):
        yield RecordBatch.from_records(records[i : i + CHUNK])
