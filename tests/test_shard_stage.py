"""The per-shard stage (transforms/shard_stage.py): the columnar path for plain keys writes the
same rows as building every key's Annotation and deciding it one by one."""

import dataclasses

import apache_beam as beam
import pyarrow as pa

from pipeline.config import DecideConfig
from schemas.arrow import info_table
from schemas.elements import ClusterAssignment, Failure, SampleInfo
from transforms.annotate import annotation_row
from transforms.decide import decide, manifest_row
from transforms.shard_stage import AnnotateShardFn, shard_annotations
from transforms.write import read_table


def _grouped():
    infos = [
        SampleInfo(f"k{i}", "s0", f"u{i}", f"cap {i}", f"h{i}", "", 10 + i, 20, "{}", 0 if i % 2 else 5, 7)
        for i in range(9)
    ]
    infos.append(SampleInfo("k0", "s0", "dup", "repeat", "x", "", 1, 1))  # a key repeated in the shard
    return {
        "info": [info_table(infos[5:]), info_table(infos[:5])],
        "assignment": [
            ClusterAssignment("k1", "k1", 2, True, "exact", 1.0, "s0"),
            ClusterAssignment("k2", "k1", 2, False, "clip", 0.97, "s0"),
        ],
        "failure": [
            Failure("k9", "s0", "decode", "corrupt_image", "bad"),
            Failure("k4", "s0", "read", "duplicate_key", "m"),
        ],
        "late_failure": [Failure("k5", "s0", "probe", "probe_error", "x")],
        "codes": [("k3", ("word_trigger:cat",))],
        "duplication": [("k1", ("k1", "full")), ("k2", ("k1", "full"))],
        "moved": ["k4"],
    }


def test_plain_keys_written_columnar_equal_the_row_path(tmp_path):
    cfg = DecideConfig()
    grouped = _grouped()
    expected = shard_annotations(grouped)
    keys = [a.key for a in expected]
    assert keys == sorted(keys) and "k4" not in keys and {"k0", "k8", "k9"} <= set(keys)
    fn = AnnotateShardFn(cfg, str(tmp_path), diversify=True)
    fn.start_bundle()
    out = list(fn.process(("s0", grouped)))
    fn.finish_bundle()  # the parts are written on helper threads: in place when the bundle ends
    written = [o for o in out if not isinstance(o, beam.pvalue.TaggedOutput)]
    assert len(written) == 3  # annotations, manifest, failures parts
    manifest = read_table(str(tmp_path / "manifest")).to_pylist()
    assert manifest == [manifest_row(a, *decide(a, cfg)) for a in expected]
    annotations = read_table(str(tmp_path / "annotations")).to_pylist()
    assert annotations == [annotation_row(a) | {"trigger_codes": list(a.trigger_codes)} for a in expected]
    by_key = {r["key"]: r for r in manifest}
    assert by_key["k0"]["url"] in ("u0", "dup")  # one record of the repeated key
    assert by_key["k2"]["decision"] == "drop" and by_key["k5"]["status"] == "failed"
    assert by_key["k8"]["decision"] == "keep" and by_key["k8"]["cluster_id"] == "k8"
    tags = {o.tag for o in out if isinstance(o, beam.pvalue.TaggedOutput)}
    assert {"blockable", "words", "cluster_captions", "diversify"} <= tags
    failures = read_table(str(tmp_path / "failures")).to_pylist()
    assert [(r["key"], r["error_type"]) for r in failures] == [("k4", "duplicate_key"), ("k9", "corrupt_image")]


def test_probe_parts_apply_the_sample_budget_per_key():
    """The probe's per-shard parts keep the keys the old per-element budget filter kept."""
    import random

    from transforms.probe_stage import _shard_parts

    infos = [SampleInfo(f"k{i:03d}", "s1", "", f"c {i}", "", "", 1, 1) for i in range(200)]
    kept = [i.key for i in infos if random.Random(f"7:{i.key}").random() < 0.3]
    ((shard, got),) = list(_shard_parts(info_table(infos), 0.3, 7))
    assert shard == "s1" and [i.key for i in got] == kept and 30 < len(kept) < 90
    assert list(_shard_parts(infos[0], None, 7)) == [("s1", [infos[0]])]


def test_keys_with_only_an_assignment_equal_build_annotation(tmp_path):
    """Clustered keys with nothing else (built from the info columns) and assignments arriving as
    tuple lists give the Annotations ``build_annotation`` gives, and the same written rows."""
    from schemas.arrow import infos_of
    from transforms.annotate import annotation_from_row, build_annotation
    from transforms.shard_columns import annotation_table

    grouped = _grouped()
    tuples = [("k6", "k6", 2, True, "clip", 1.0, "s0"), ("k7", "k6", 2, False, "phash", 0.93, "s0")]
    grouped["assignment"] = [*grouped["assignment"], tuples]
    rich = [annotation_from_row(r) for r in annotation_table(grouped).to_pylist()]
    by_key = {a.key: a for a in rich}
    infos = {i.key: i for t in grouped["info"] for i in infos_of(t)}
    for key, row in (("k6", tuples[0]), ("k7", tuples[1])):
        expected = build_annotation(key, {"info": [infos[key]], "assignment": [ClusterAssignment(*row)]})
        assert by_key[key] == expected and expected.cluster_id == "k6"
    assert [a.key for a in rich] == sorted(by_key)
    cfg = DecideConfig()
    fn = AnnotateShardFn(cfg, str(tmp_path), diversify=False)
    fn.start_bundle()
    list(fn.process(("s0", grouped)))
    fn.finish_bundle()
    manifest = {r["key"]: r for r in read_table(str(tmp_path / "manifest")).to_pylist()}
    assert manifest["k7"] == manifest_row(by_key["k7"], *decide(by_key["k7"], cfg))
    assert manifest["k7"]["decision"] == "drop" and manifest["k6"]["is_representative"]


def test_batched_sparse_records_give_the_same_tables(tmp_path):
    """Trigger codes and duplication classes arriving as per-shard batches (``BatchByShard``)
    annotate as the single elements do."""
    from transforms.shard_columns import Batch, BatchByShard, annotation_table

    grouped = _grouped()
    grouped["codes"] = [*grouped["codes"], ("k6", ("word_trigger:dog",)), ("k3", ("template_caption",))]
    batched = dict(grouped)
    batched["codes"] = [Batch(grouped["codes"][:2]), grouped["codes"][2]]
    batched["duplication"] = [Batch(grouped["duplication"])]
    assert annotation_table(batched).equals(annotation_table(grouped))
    as_table = dict(grouped)  # assignments as a table of ClusterAssignment's columns
    as_table["assignment"] = [pa.Table.from_pylist([dataclasses.asdict(a) for a in grouped["assignment"]])]
    assert annotation_table(as_table).equals(annotation_table(grouped))
    codes = {r["key"]: r["trigger_codes"] for r in annotation_table(grouped).to_pylist()}
    assert codes["k3"] == ["template_caption", "word_trigger:cat"] and codes["k6"] == ["word_trigger:dog"]
    fn = BatchByShard(size=2)
    fn.start_bundle()
    full = [out for kv in [("s0", 1), ("s1", 2), ("s0", 3), ("s0", 4)] for out in fn.process(kv)]
    rest = [w.value for w in fn.finish_bundle()]
    assert full == [("s0", [1, 3])] and rest == [("s0", [4]), ("s1", [2])]


def test_columnar_join_equals_the_row_path_on_repeats_and_strays(tmp_path):
    """Codes repeated across records (a union, sorted), a code for a key of no row, duplication
    classes of another cluster id or repeated (the last wins), assignments as per-shard tables
    and info batches holding only the stage's columns: the same table as the row path."""
    from transforms.assignment_tables import assignment_shards
    from transforms.shard_columns import annotation_table, info_for_annotations

    grouped = _grouped()
    grouped["codes"] = [
        ("k3", ("word_trigger:dog", "duplicate_caption")),
        ("k3", ("duplicate_caption", "word_trigger:cat")),
        ("k7", ("template_caption",)),
        ("nowhere", ("word_trigger:x",)),
    ]
    grouped["duplication"] = [("k1", ("k1", "partial")), ("k2", ("k9", "full")), ("k1", ("k1", "full"))]
    expected = {a.key: a for a in shard_annotations(grouped)}
    assert expected["k3"].trigger_codes == ("duplicate_caption", "word_trigger:cat", "word_trigger:dog")
    assert expected["k1"].duplication == "full" and expected["k2"].duplication == ""
    table = pa.Table.from_pylist([dataclasses.asdict(a) for a in grouped["assignment"]])
    columnar = dict(grouped)
    columnar["assignment"] = [t for _, t in assignment_shards(table)]
    columnar["info"] = [info_for_annotations(t) for t in grouped["info"]]
    assert "meta_json" not in columnar["info"][0].column_names
    got = annotation_table(columnar)
    assert got.equals(annotation_table(grouped))
    rows = {r["key"]: r for r in got.to_pylist()}
    assert set(rows) == set(expected)
    for key, a in expected.items():
        assert rows[key] == annotation_row(a) | {"trigger_codes": list(a.trigger_codes)}, key


def test_duplication_classes_of_distinct_keys_equal_the_row_path():
    """Each key once in the duplication records (the columnar lookup by key, no merge): a class
    of another cluster id is not the row's; a key of no row, or unclustered, gets none."""
    from transforms.shard_columns import annotation_table

    grouped = _grouped()
    grouped["duplication"] = [
        ("k2", ("k9", "full")),
        ("k1", ("k1", "partial")),
        ("k6", ("k6", "full")),
        ("zz", ("k1", "full")),
    ]
    expected = {a.key: a.duplication for a in shard_annotations(grouped)}
    got = {r["key"]: r["duplication"] for r in annotation_table(grouped).to_pylist()}
    assert got == expected and got["k1"] == "partial" and got["k2"] == "" and got["k6"] == ""
