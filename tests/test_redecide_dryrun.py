"""The columnar ``memsieve decide --dry-run`` counts what the row-by-row definition counts: ``decide``
per annotation against the manifest row of the same key, families once per row, "(none)" where the
manifest lacks the row or its part."""

import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipeline.redecide import _load_run, _parts
from pipeline.redecide_dry import dry_run, format_changes
from transforms.annotate import annotation_from_row
from transforms.decide import decide, reason_family


def _row_by_row(run_dir: str, overrides: list[str]) -> dict:
    """The dry run as it was written before it went columnar (one dict and one ``decide`` a row)."""
    import os

    _, cfg = _load_run(run_dir, overrides)
    before, after = Counter(), Counter()
    transitions, reasons_before, reasons_after = Counter(), Counter(), Counter()
    for path in _parts(run_dir):
        old_path = os.path.join(run_dir, "manifest", os.path.basename(path))
        old = {}
        if os.path.isfile(old_path):
            old = {r["key"]: r for r in pq.read_table(old_path, columns=["key", "decision", "reasons"]).to_pylist()}
        for r in pq.read_table(path).to_pylist():
            decision, reasons = decide(annotation_from_row(r), cfg.decide)
            prev = old.get(r["key"], {"decision": "(none)", "reasons": []})
            before[prev["decision"]] += 1
            after[decision] += 1
            reasons_before.update({reason_family(x) for x in prev["reasons"] or []})
            reasons_after.update({reason_family(x) for x in reasons})
            if prev["decision"] != decision:
                transitions[f"{prev['decision']}->{decision}"] += 1
    families = sorted(set(reasons_before) | set(reasons_after))
    return {
        "run_dir": run_dir,
        "overrides": list(overrides),
        "changed": sum(transitions.values()),
        "decisions_before": dict(sorted(before.items())),
        "decisions_after": dict(sorted(after.items())),
        "transitions": dict(sorted(transitions.items())),
        "reasons": {f: {"before": reasons_before.get(f, 0), "after": reasons_after.get(f, 0)} for f in families},
    }


@pytest.fixture(scope="module")
def damaged_run(demo_run, tmp_path_factory):
    """The demo run with one manifest part gone and a few rows missing from another."""
    run = tmp_path_factory.mktemp("dry") / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("cache"))
    parts = sorted((run / "manifest").glob("*.parquet"))
    assert len(parts) >= 2
    parts[0].unlink()
    t = pq.read_table(parts[1])
    pq.write_table(t.slice(3), parts[1])
    return run


OVERRIDES = [
    [],
    ["decide.drop_duplicates=false"],
    ["decide.probe_threshold=0.0", "decide.drop_flagged_probe=true", "decide.diversify_triggers=false"],
    ["decide.diversify_full_duplication=true", "decide.drop_failed=false"],
]


@pytest.mark.parametrize("overrides", OVERRIDES)
def test_columnar_dry_run_equals_the_row_by_row_definition(demo_run, overrides):
    got = dry_run(str(demo_run), overrides)
    assert got == _row_by_row(str(demo_run), overrides)
    assert got["changed"] or not overrides
    assert format_changes(got).startswith(f"dry run of {demo_run}")


@pytest.mark.parametrize("overrides", OVERRIDES[:2])
def test_rows_missing_from_the_manifest_count_as_none(damaged_run, overrides):
    got = dry_run(str(damaged_run), overrides)
    assert got == _row_by_row(str(damaged_run), overrides)
    assert got["decisions_before"]["(none)"] > 3 and got["changed"] >= got["decisions_before"]["(none)"]
