"""``memsieve decide RUN_DIR --set ...`` on a copy of the demo run: only decisions and reasons move."""

import hashlib
import json
import shutil
import statistics

import pytest

from pipeline.cli import main as cli_main
from pipeline.redecide import PENDING, redecide
from transforms.write import read_table

UNCHANGED_TABLES = ("annotations", "clusters", "neighbours", "scores", "failures", "triggers", "shards")


@pytest.fixture()
def run_dir(demo_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(demo_run, target, ignore=shutil.ignore_patterns("cache"))
    return target


def _digests(root, tables) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for t in tables
        for p in sorted((root / t).rglob("*"))
        if p.is_file()
    }


def _manifest(run_dir):
    return read_table(str(run_dir / "manifest")).to_pandas().set_index("key").sort_index()


def test_no_override_reproduces_the_runs_tables(run_dir):
    before = json.loads((run_dir / "run.json").read_text())["checksums"]
    blocklist = (run_dir / "blocklist.txt").read_text()
    run = redecide(str(run_dir), [])
    assert run["checksums"] == before  # byte for byte: manifest, diversify, blocklist and the rest
    assert (run_dir / "blocklist.txt").read_text() == blocklist


def test_other_thresholds_change_only_decisions_and_reasons(run_dir):
    before = _manifest(run_dir)
    untouched = _digests(run_dir, UNCHANGED_TABLES)
    full_s = json.loads((run_dir / "run.json").read_text())["timings_s"]["pipeline"]
    scores = before["probe_score"].dropna()
    cut = float(statistics.median(scores))
    overrides = [f"decide.probe_threshold={cut}", "decide.drop_flagged_probe=true", "decide.drop_duplicates=false"]
    run = redecide(str(run_dir), overrides)

    after = _manifest(run_dir)
    assert list(after.index) == list(before.index)
    for column in before.columns:
        if column not in ("decision", "reasons"):
            assert before[column].astype(str).tolist() == after[column].astype(str).tolist(), column
    assert _digests(run_dir, UNCHANGED_TABLES) == untouched
    ok = after["status"] == "ok"
    flagged = ok & (after["probe_score"] >= cut)
    assert flagged.sum() >= len(scores) // 2
    assert (after.loc[flagged, "decision"] == "drop").all()
    assert all(list(r) == ["memorized:probe"] for r in after.loc[flagged, "reasons"])
    assert not any(r.startswith("duplicate:") for rs in after["reasons"] for r in rs)  # drop_duplicates=false
    assert (before["decision"] != after["decision"]).sum() > 0

    decisions = after["decision"].value_counts().to_dict()
    assert run["summary"]["decisions"] == run["counters"]["decide"] == decisions
    assert run["config"]["decide"]["probe_threshold"] == cut and run["redecided"][-1]["overrides"] == overrides
    dropped = after[(after["decision"] == "drop") & (after["status"] == "ok")]  # content drops only
    assert sorted((run_dir / "blocklist.txt").read_text().split()) == sorted({u for u in dropped["url"] if u})
    assert set(read_table(str(run_dir / "blocklist")).column("key").to_pylist()) == set(
        after.index[after["decision"] == "drop"]
    )
    diversified = set(read_table(str(run_dir / "diversify")).column("key").to_pylist())
    assert diversified and diversified <= set(after.index[after["decision"] == "diversify"])
    assert "Re-decided from stored annotations" in (run_dir / "report" / "index.html").read_text()
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["summary"] == run["summary"] and not (run_dir / PENDING).exists()

    # acceptance 1: under 10% of the full run's time, the policy alone and everything together
    # (filtered shards copied again, report re-rendered with thumbnails reused)
    timings = run["timings_s"]
    assert timings["redecide"] < 0.1 * full_s, timings
    assert timings["redecide_total"] < 0.1 * full_s, timings


def test_bad_override_exits_2_and_changes_nothing(run_dir, capsys):
    everything = _digests(run_dir, ["."])
    assert cli_main(["decide", str(run_dir), "--set", "decide.no_such_field=1"]) == 2
    assert "decide.no_such_field" in capsys.readouterr().err
    assert cli_main(["decide", str(run_dir), "--set", "decide.min_duplicate_similarity=2"]) == 2
    assert cli_main(["decide", str(run_dir / "nowhere")]) == 2
    assert _digests(run_dir, ["."]) == everything


def test_an_interrupted_redecide_resumes(run_dir):
    """A re-decide killed after it moved run.json aside (and left staging folders) can be re-run."""
    before = json.loads((run_dir / "run.json").read_text())["checksums"]
    (run_dir / "run.json").rename(run_dir / PENDING)
    (run_dir / "manifest.tmp-999").mkdir()
    (run_dir / "manifest.tmp-999" / "part-x.parquet").write_bytes(b"partial")
    assert cli_main(["decide", str(run_dir)]) == 0
    assert json.loads((run_dir / "run.json").read_text())["checksums"] == before
    assert not (run_dir / PENDING).exists() and not (run_dir / "manifest.tmp-999").exists()


def _tree(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_dry_run_counts_changes_and_writes_nothing(run_dir, capsys):
    everything = _tree(run_dir)
    before = _manifest(run_dir)
    assert cli_main(["decide", str(run_dir), "--dry-run", "--set", "decide.drop_duplicates=false"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])  # the scheduler's line comes last
    assert "would change" in out[0] and summary["status"] == "dry_run"
    assert _tree(run_dir) == everything
    duplicates = sum(any(r.startswith("duplicate:") for r in rs) for rs in before["reasons"])
    assert duplicates > 0 and summary["changed"] == duplicates
    assert summary["decisions_before"] == before["decision"].value_counts().to_dict()
    assert summary["decisions_after"]["drop"] == summary["decisions_before"]["drop"] - duplicates
    assert summary["reasons"]["duplicate:phash"]["after"] == 0 and summary["reasons"]["duplicate:phash"]["before"] > 0


def test_output_writes_a_new_decision_set_and_leaves_the_run(run_dir, tmp_path, capsys):
    everything = _tree(run_dir)
    new = tmp_path / "new"
    assert cli_main(["decide", str(run_dir), "--output", str(new), "--set", "decide.drop_duplicates=false"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        summary["output"] == str(new) and summary["decisions"]["drop"] < _manifest(run_dir)["decision"].eq("drop").sum()
    )
    assert _tree(run_dir) == everything  # RUN byte-identical
    after = _manifest(new)
    assert not any(r.startswith("duplicate:") for rs in after["reasons"] for r in rs)
    assert _digests(new, UNCHANGED_TABLES) == _digests(run_dir, UNCHANGED_TABLES)
    run = json.loads((new / "run.json").read_text())
    assert run["decided_from"] == str(run_dir) and (new / "report" / "index.html").is_file()
    # NEW is itself a run folder: deciding it again with no override reproduces its tables
    assert redecide(str(new), [])["checksums"] == run["checksums"]
    assert _tree(run_dir) == everything
    assert cli_main(["decide", str(run_dir), "--output", str(new)]) == 2  # not an empty folder


def test_blocklist_separates_content_drops_and_names_the_kept_copy(run_dir):
    rows = read_table(str(run_dir / "blocklist")).to_pylist()
    manifest = _manifest(run_dir)
    by_category = {}
    for r in rows:
        by_category.setdefault(r["category"], []).append(r)
    assert by_category["duplicate"] and by_category["dead_link"]
    for r in by_category["duplicate"]:
        kept = manifest.loc[r["kept_key"]]
        assert kept["is_representative"] and kept["decision"] != "drop"
        assert kept["cluster_id"] == manifest.loc[r["key"]]["cluster_id"] and r["kept_url"] == kept["url"]
    for r in by_category["dead_link"]:
        assert r["reason"].startswith("failed:download:") and r["kept_key"] is None
    published = (run_dir / "blocklist.txt").read_text().split()
    content = {r["url"] for c in ("duplicate", "memorized") for r in by_category.get(c, [])}
    assert set(published) == content and not {r["url"] for r in by_category["dead_link"]} & set(published)
    sidecar = json.loads((run_dir / "blocklist.json").read_text())
    assert sidecar["version"] == "1" and sidecar["published_categories"] == ["duplicate", "memorized"]
    assert sidecar["rows_by_category"]["duplicate"] == len(by_category["duplicate"])
    tsv = (run_dir / "blocklist.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:3] == ["url", "category", "reason"] and len(tsv) == len(rows) + 1


def test_a_url_cannot_inject_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.blocklist import write_blocklist_txt
    from schemas import arrow

    (tmp_path / "blocklist").mkdir()
    row = {"url": "http://x/a\nhttp://evil/", "sha256": "s", "key": "k", "reason": "memorized:probe"}
    row.update(category="memorized", kept_key=None, kept_url=None)
    pq.write_table(pa.Table.from_pylist([row], schema=arrow.BLOCKLIST), tmp_path / "blocklist" / "part-a.parquet")
    assert write_blocklist_txt(str(tmp_path)) == 1
    assert (tmp_path / "blocklist.txt").read_text() == "http://x/a%0Ahttp://evil/\n"
