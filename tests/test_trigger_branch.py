"""MineTriggers' caption branch from the reader's info tables: the same outputs as from per-sample
infos, and a graph in which the caption stages do not wait for the cluster assignments."""

import dataclasses
import os
import pickle
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

NAMES = ("keywords", "objects", "duplication", "codes", "duplication_rows")


def _planted(n: int = 1200):
    """Planted triggers, plus exact, near-duplicate and template captions across clusters."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    from make_trigger_testset import planted_set

    infos, assignments, _ = planted_set(n, seed=3)
    out = []
    for i, info in enumerate(infos):
        if i % 7 == 0:  # exact duplicates in many clusters
            info = dataclasses.replace(info, caption="A red barn at sunset, wide angle!")
        elif i % 11 == 0:  # near duplicates: one word more or less of a long caption
            words = "old stone bridge over a quiet river in the misty morning light".split()
            info = dataclasses.replace(info, caption=" ".join(words[: 9 + i % 3]))
        elif i % 13 == 0:  # a template with a numeric slot
            info = dataclasses.replace(info, caption=f"Stock photo number {i} of the collection")
        out.append(dataclasses.replace(info, shard=f"s{i % 3}"))
    shard = {i.key: i.shard for i in out}
    return out, [dataclasses.replace(a, shard=shard[a.key]) for a in assignments]


def _mine(tmp_path, tag: str, inputs, cfg) -> dict:
    from transforms.triggers import MineTriggers

    def dump(value, name):
        (tmp_path / f"{tag}-{name}").write_bytes(pickle.dumps(value))

    with TestPipeline(runner="DirectRunner") as p:
        out = {k: p | f"Create{k}" >> beam.Create(v) for k, v in inputs.items()} | MineTriggers(cfg, buckets=3)
        out["codes"] = out["codes"] | beam.FlatMap(lambda kv: [(key, kv[0], codes) for key, codes in kv[1]])
        out["duplication_rows"] = out["duplication_rows"] | "Rows" >> beam.FlatMap(
            lambda kv: [(kv[0], row) for row in kv[1]]
        )
        for name in NAMES:
            _ = out[name] | f"Gather{name}" >> beam.combiners.ToList() | f"Dump{name}" >> beam.Map(dump, name)
    got = {name: pickle.loads((tmp_path / f"{tag}-{name}").read_bytes()) for name in NAMES}
    merged: dict = {}  # a key's codes may come in several elements (word, caption, template codes)
    for key, shard, codes in got["codes"]:
        merged.setdefault((key, shard), set()).update(codes)
    got["codes"] = merged
    return {name: sorted(v.items()) if isinstance(v, dict) else sorted(map(repr, v)) for name, v in got.items()}


@pytest.mark.parametrize("m", [10, 1])  # m = 1: pairs of clusters of one counted after the join
def test_info_batches_mine_what_per_sample_infos_mine(tmp_path, m):
    from pipeline.config import TriggersConfig
    from schemas import arrow

    infos, assignments = _planted()
    cfg = TriggersConfig(min_pair_count=m, template_min_df=5)
    want = _mine(tmp_path, "infos", {"infos": infos, "assignments": assignments}, cfg)
    by_shard: dict = {}
    for i in infos:
        by_shard.setdefault(i.shard, []).append(i)
    tables = [arrow.info_table(v[a : a + 150]) for _, v in sorted(by_shard.items()) for a in range(0, len(v), 150)]
    rows: dict = {}
    for a in assignments:
        rows.setdefault(a.shard, []).append((a.key, a.cluster_id, a.cluster_size))
    got = _mine(tmp_path, "tables", {"info_batches": tables, "assignment_rows": sorted(rows.items())}, cfg)
    assert got == want
    codes = {c for _, cs in want["codes"] for c in cs}
    assert {"duplicate_caption", "near_duplicate_caption", "template_caption"} <= codes


def _producers(p: beam.Pipeline) -> dict:
    """full label -> the full labels of the transforms whose outputs it reads (side inputs too)."""
    from apache_beam.pipeline import PipelineVisitor

    made_by: dict = {}
    reads: dict = {}

    class Visitor(PipelineVisitor):
        def visit_transform(self, node):
            for out in node.outputs.values():
                made_by[out] = node.full_label
            reads[node.full_label] = list(node.inputs) + [s.pvalue for s in node.side_inputs]

    p.visit(Visitor())
    return {label: {made_by[pc] for pc in pcs if pc in made_by} for label, pcs in reads.items()}


def _upstream(producers: dict, label: str) -> set:
    seen, todo = set(), [label]
    while todo:
        for up in producers.get(todo.pop(), ()):
            if up not in seen:
                seen.add(up)
                todo.append(up)
    return seen


def test_caption_branch_does_not_wait_for_the_assignments():
    from pipeline.config import TriggersConfig
    from transforms.triggers import MineTriggers

    p = beam.Pipeline()
    tables = p | "Tables" >> beam.Create([])
    rows = p | "AssignmentRows" >> beam.Create([])
    _ = {"info_batches": tables, "assignment_rows": rows} | "MineTriggers" >> MineTriggers(TriggersConfig())
    producers = _producers(p)
    early = [
        "MineTriggers/Captions",
        "MineTriggers/DuplicateCaptions/Near/NearInBands",
        "MineTriggers/DuplicateCaptions/NearAndShared/FlatMap(near_and_shared)",
        "MineTriggers/Skeletons/PerGroup",
        "MineTriggers/CountAll/Combine/ParDo(CombineValuesDoFn)",
    ]
    for label in [*early, "MineTriggers/Records/ParDo(ClusterRecordsFn)"]:
        assert label in producers, label
    for label in early:
        assert not any(up.startswith("AssignmentRows") for up in _upstream(producers, label)), label
    assert "AssignmentRows/Map(decode)" in _upstream(producers, "MineTriggers/Records/ParDo(ClusterRecordsFn)")
    # the caption records are made after a shuffle of their own (not in the reader's stage), and
    # the band entries after another (not in the stage that makes the records)
    assert producers["MineTriggers/Captions"] == {"MineTriggers/GroupInfos"}
    near = "MineTriggers/DuplicateCaptions/Near/"
    assert producers[near + "Bands"] == {near + "ShuffleNorms"}


def test_join_part_rows_are_the_batch_rows():
    """A JoinPart (Arrow keys and captions, CSR terms) gives back the batch's rows, as
    ``RecordBatch.take`` does, the raw caption replaced by the normalized one; a caption Arrow
    does not take (a lone surrogate) and a batch of several shards travel too."""
    import numpy as np

    from transforms.trigger_join import JoinPart
    from transforms.trigger_records import RecordBatch

    records = [
        {
            "key": f"k{i}",
            "shard": f"s{i % 2}" if i > 3 else "s0",
            "caption": f"Raw {i}",
            "norm": "caf\udce9 bar" if i == 5 else f"raw {i}",
            "terms": tuple(sorted({f"t{i % 3}", f"t{i % 5}"})) if i % 4 else (),
            "objects": ["tree"] if i % 3 == 0 else [],
            "cluster_id": f"k{i}",
            "cluster_size": 1,
        }
        for i in range(12)
    ]
    batch = RecordBatch.from_records(records)
    part = pickle.loads(pickle.dumps(JoinPart.of(batch)))
    assert isinstance(part.norms, list)  # the surrogate: no Arrow array
    for rows in (None, np.array([0, 3, 5, 11]), np.array([7])):
        want = list(batch) if rows is None else list(batch.take(rows.tolist()))
        got = list(part.records(rows))
        assert got == [dict(r, caption=r["norm"]) for r in want]
    assert JoinPart.of(RecordBatch.from_records(records[:4])).shard == "s0"
