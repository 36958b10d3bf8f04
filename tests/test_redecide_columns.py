"""The columnar re-decide (``decide_columns`` + ``manifest_table``) writes what the row-by-row
definition gives: ``decide`` + ``manifest_row`` per annotation, ``blocklist_row`` with the kept
copy per dropped row, and the same counters."""

from collections import Counter

import pytest

from pipeline.redecide import redecide
from transforms.annotate import annotation_from_row
from transforms.decide import blocklist_row, decide, is_kept_copy, manifest_row, reason_family
from transforms.write import read_table


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["decide.probe_threshold=0.0", "decide.drop_flagged_probe=true", "decide.diversify_triggers=false"],
        ["decide.drop_duplicates=false", "decide.diversify_full_duplication=true", "decide.drop_failed=false"],
    ],
)
def test_columnar_redecide_equals_the_row_by_row_definition(demo_run, tmp_path, overrides):
    out = tmp_path / "new"
    run = redecide(str(demo_run), overrides, output=str(out))
    from pipeline.redecide import _load_run

    _, cfg = _load_run(str(out), [])
    rows = read_table(str(demo_run / "annotations")).to_pylist()
    expected, decisions, families = {}, Counter(), Counter()
    for r in rows:
        a = annotation_from_row(r)
        decision, reasons = decide(a, cfg.decide)
        expected[a.key] = manifest_row(a, decision, reasons)
        decisions[decision] += 1
        families.update(reason_family(x) for x in reasons)
    manifest = {r["key"]: r for r in read_table(str(out / "manifest")).to_pylist()}
    assert manifest == expected
    assert run["counters"]["decide"] == dict(decisions) and run["counters"]["decide_reason"] == dict(families)

    kept = {}
    for r in expected.values():
        pair = (r["key"], r["url"] or "")
        if r["status"] == "ok" and is_kept_copy(r) and pair < kept.get(r["cluster_id"], (chr(0x10FFFF),)):
            kept[r["cluster_id"]] = pair
    want = sorted(
        (blocklist_row(r, kept.get(r["cluster_id"])) for r in expected.values() if r["decision"] == "drop"),
        key=lambda b: b["key"],
    )
    table = read_table(str(out / "blocklist"))
    got = sorted(table.to_pylist() if table is not None else [], key=lambda b: b["key"])
    assert got == want and (want or "drop_duplicates=false" in " ".join(overrides))
    assert overrides or any(b["kept_key"] for b in got)  # the demo run's duplicates name their kept copy


def test_each_annotations_part_is_read_twice_at_most(demo_run, tmp_path, monkeypatch):
    """A first pass of the policy's and the context's columns (no image sizes, no digests), then
    the whole part for its manifest part: no third read, no whole-table first pass."""
    import os

    import pyarrow.parquet as pq

    reads: dict[str, list] = {}
    real = pq.read_table

    def counting(source, *args, columns=None, **kwargs):
        if f"{os.sep}annotations{os.sep}" in str(source):
            reads.setdefault(str(source), []).append(columns)
        return real(source, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", counting)
    redecide(str(demo_run), ["decide.drop_duplicates=false"], output=str(tmp_path / "new"))
    assert reads and all(len(r) == 2 for r in reads.values()), reads
    assert all(r[0] is not None and "sha256" not in r[0] and r[1] is None for r in reads.values())


def _bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["decide.drop_duplicates=false", "decide.diversify_full_duplication=true"],
        ["decide.drop_duplicates=false", "diversify.n_alternatives=2"],  # new settings: nothing reused
    ],
)
def test_reused_diversify_rows_equal_the_drawn_ones(demo_run, tmp_path, monkeypatch, overrides):
    """Rows of keys diversified before and now come from the run's diversify/ table when its
    settings and seed are the same: the same bytes as drawing every row again (a copy of the run
    without diversify/), and only the other rows are drawn."""
    import shutil

    from transforms import diversify_columns

    bare = tmp_path / "bare"
    shutil.copytree(demo_run, bare, ignore=shutil.ignore_patterns("cache", "diversify"))
    redecide(str(bare), overrides, output=str(tmp_path / "drawn"))
    drawn = []
    real = diversify_columns.diversify_table
    monkeypatch.setattr(
        diversify_columns,
        "diversify_table",
        lambda rows, *a: drawn.extend(rows.column("key").to_pylist()) or real(rows, *a),
    )
    redecide(str(demo_run), overrides, output=str(tmp_path / "reused"))
    assert _bytes(tmp_path / "reused" / "diversify") == _bytes(tmp_path / "drawn" / "diversify")
    manifest = read_table(str(tmp_path / "reused" / "manifest"))
    now = {
        k
        for k, d in zip(manifest.column("key").to_pylist(), manifest.column("decision").to_pylist(), strict=True)
        if d == "diversify"
    }
    before = set(read_table(str(demo_run / "diversify")).column("key").to_pylist())
    if "diversify.n_alternatives=2" in overrides:
        assert set(drawn) == now
        assert (
            max(len(a) for a in read_table(str(tmp_path / "reused" / "diversify")).column("alternatives").to_pylist())
            == 2
        )
    else:
        assert set(drawn) == now - before and (now & before)
