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
