"""FindDuplicates' assignment tables and their consumers (routing to shards, clusters/, probe
keepers, duplication members), the Arrow key order and the sort-based unique."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.arrow import info_table
from schemas.elements import ClusterAssignment, Edge, SampleInfo
from transforms import cluster_columns
from transforms.assignment_tables import (
    ASSIGNMENT_SCHEMA,
    assignment_elements,
    assignment_rows,
    cluster_table,
    representatives,
)
from transforms.dedup import FindDuplicates
from transforms.key_batches import key_ids, sorted_unique

KEYS = ["b", "a\x00", "a", "é", "Z", "ab", "日本", "a\x00x", "\U0001f600", "ba", "a"]


def test_sorted_unique_equals_np_unique():
    rng = np.random.default_rng(0)
    for x in (rng.integers(-(2**62), 2**62, 5000), rng.integers(0, 7, 300), np.zeros(0, np.int64), np.array([5])):
        assert np.array_equal(sorted_unique(x), np.unique(x))


def test_key_codes_follow_python_string_order():
    keys = np.array(KEYS, dtype=object)
    uniq, code = cluster_columns._key_codes(keys)
    assert list(uniq) == sorted(set(KEYS))
    assert [uniq[c] for c in code] == KEYS


def _table():
    """Two clusters from the vectorised path: {a, b, c} (c: a member without an edge to the keeper)
    and {d, e} where only d has an info row (a cluster of one counted: size 1)."""
    infos = [
        SampleInfo("a", "s1", "", "", "", "", 10, 10),
        SampleInfo("b", "s0", "", "", "", "", 20, 20),
        SampleInfo("c", "s1", "", "", "", "", 5, 5),
        SampleInfo("d", "s0", "", "", "", "", 5, 5),
    ]
    features = [t for _, t in cluster_columns.feature_tables(info_table(infos), 1, False)]
    batch = cluster_columns.edge_batch(["a", "b", "d"], ["b", "c", "e"], [0.95, 0.91, 0.97], "clip")
    id_of = dict(zip("abcde", key_ids(list("abcde")).tolist(), strict=True))
    component = {"a": "abc", "b": "abc", "c": "abc", "d": "de", "e": "de"}
    ids = np.array([id_of[k] for k in "abcde"])
    roots = np.array([min(id_of[m] for m in component[k]) for k in "abcde"])
    item = (0, {"root": [(ids, roots)], "features": features, "edge": [cluster_columns.id_columns(batch)]})
    by_root = {}
    for b, (tag, value) in cluster_columns.labelled(item, 1):
        by_root.setdefault(b, []).append((tag, value))
    (table,) = [t for b in sorted(by_root) for t in cluster_columns.assign_tables((b, by_root[b]), "resolution")]
    return table


def test_assignment_table_and_its_consumers():
    table = _table()
    assert table.schema == ASSIGNMENT_SCHEMA
    got = sorted(assignment_elements(table), key=lambda a: a.key)
    assert got == [
        ClusterAssignment("a", "a", 3, False, "clip", 0.95, "s1"),
        ClusterAssignment("b", "a", 3, True, "clip", 1.0, "s0"),
        ClusterAssignment("c", "a", 3, False, "clip", 0.91, "s1"),
        ClusterAssignment("d", "d", 1, True, "clip", 1.0, "s0"),
    ]
    rows = list(assignment_rows(table))
    assert [s for s, _ in rows] == ["s0", "s1"]
    assert sorted((ClusterAssignment(*r) for _, rs in rows for r in rs), key=lambda a: a.key) == got
    assert all(r[6] == shard for shard, rs in rows for r in rs)
    clusters = cluster_table(table.set_column(4, "embedder", pa.array(["", "clip", "", "x"][: table.num_rows])))
    assert sorted(clusters.column("key").to_pylist()) == ["a", "b", "c"]  # size 1: not a cluster row
    assert set(clusters.column("embedder").to_pylist()) <= {"exact", "clip"}
    assert clusters.column_names == ["key", "cluster_id", "embedder", "similarity", "cluster_size", "is_representative"]
    assert list(representatives(table)) == [("s0", "b")]


def test_tables_without_per_key_elements_hold_the_same_assignments():
    infos = [SampleInfo(k, f"s{i % 2}", "", "", "", "", 10 + i, 10) for i, k in enumerate("abcdefg")]
    edges = [Edge("a", "b", 0.97, "clip"), Edge("b", "c", 0.9, "phash"), Edge("e", "f", 0.95, "clip")]
    with TestPipeline(runner="DirectRunner") as p:
        inputs = {"info_batches": p | "I" >> beam.Create([info_table(infos)]), "edges": p | "E" >> beam.Create(edges)}
        both = inputs | "Both" >> FindDuplicates("resolution", exact=False, buckets=2)
        tables_only = inputs | "Tables" >> FindDuplicates("resolution", exact=False, buckets=2, per_key=False)
        assert "assignments" not in tables_only
        rows = tables_only["assignment_tables"] | beam.FlatMap(assignment_elements)
        expected = [
            ClusterAssignment("a", "a", 3, False, "clip", 0.97, "s0"),
            ClusterAssignment("b", "a", 3, False, "phash", 0.9, "s1"),
            ClusterAssignment("c", "a", 3, True, "phash", 1.0, "s0"),
            ClusterAssignment("e", "e", 2, False, "clip", 0.95, "s0"),
            ClusterAssignment("f", "e", 2, True, "clip", 1.0, "s1"),
        ]
        assert_that(rows, equal_to(expected), label="tables")
        assert_that(both["assignments"], equal_to(expected), label="elements")


def test_dedup_progress_ticks_every_sample_once_in_find_duplicates():
    """Samples alone tick "dedup" where the labels meet the features, clustered ones as their
    cluster is assigned: together every info row, nothing left to the per-shard stage."""
    from pipeline import progress

    progress.reset()
    progress.configure("off")
    try:
        table = _table()  # 4 info rows, all clustered (d: a cluster of one counted by its edge)
        assert progress._state.counts.get("dedup") == table.num_rows == 4
        infos = info_table([SampleInfo(k, "s0", "", "", "", "", 1, 1) for k in ("x", "y")])
        features = [t for _, t in cluster_columns.feature_tables(infos, 1, False)]
        empty = np.zeros(0, np.int64)
        assert (
            list(cluster_columns.labelled((0, {"root": [(empty, empty)], "features": features, "edge": []}), 1)) == []
        )
        assert progress._state.counts["dedup"] == 6
    finally:
        progress.reset()
        progress.configure("lines")
