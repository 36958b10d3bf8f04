"""The demo run's outputs as users read them: manifest readers, re-decide, filtered shards, report."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from transforms.write import read_table


def test_manifest_reads_with_pyarrow_pandas_duckdb(demo_run):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    table = ds.dataset(str(demo_run / "manifest"), format="parquet").to_table()
    frame = pd.read_parquet(demo_run / "manifest")
    count = duckdb.sql(
        f"select count(*), count(distinct key) from read_parquet('{demo_run}/manifest/*.parquet')"
    ).fetchall()[0]
    assert table.num_rows == len(frame) == count[0] == count[1] == 104
    assert set(frame["decision"]) <= {"keep", "drop", "diversify"}
    by_decision = duckdb.sql(
        f"select decision, count(*) from read_parquet('{demo_run}/manifest/*.parquet') group by decision"
    ).fetchall()
    assert sum(n for _, n in by_decision) == 104


def test_redecide_changes_only_decisions(demo_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    before = read_table(str(run_dir / "manifest")).to_pandas().set_index("key").sort_index()
    full_s = json.loads((run_dir / "run.json").read_text())["timings_s"]["pipeline"]
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "decide", str(run_dir), "--set", "decide.drop_duplicates=false"],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    after = read_table(str(run_dir / "manifest")).to_pandas().set_index("key").sort_index()
    assert list(after.index) == list(before.index)
    same = [c for c in before.columns if c not in ("decision", "reasons")]
    for c in same:
        assert before[c].astype(str).tolist() == after[c].astype(str).tolist(), c
    assert (before["decision"] != after["decision"]).sum() > 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["decide"]["drop_duplicates"] is False
    assert run["timings_s"]["redecide"] < 0.1 * full_s, (run["timings_s"], full_s, elapsed)
    blocked = (run_dir / "blocklist.txt").read_text().split()
    assert len(blocked) == len(set(blocked)) < run["summary"]["decisions"].get("drop", 0) + 1


def test_redecide_bad_override_exits_2(demo_run):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "decide", str(demo_run), "--set", "decide.no_such_field=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "decide.no_such_field" in proc.stderr


def test_filtered_shards_hold_exactly_the_kept_keys(demo_run):
    import webdataset as wds

    manifest = read_table(str(demo_run / "manifest")).to_pylist()
    kept = {r["key"] for r in manifest if r["status"] == "ok" and r["decision"] in ("keep", "diversify")}
    diversified = {r["key"]: r["alternatives"] for r in read_table(str(demo_run / "diversify")).to_pylist()}
    urls = sorted(str(p) for p in (demo_run / "filtered").glob("*.tar"))
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        seen[sample["__key__"]] = meta["memsieve"]
        assert sample["txt"].decode().strip() == meta["caption"].strip()  # the original caption is kept
    assert set(seen) == kept
    assert diversified and all(seen[k]["alternatives"] == alts for k, alts in diversified.items())


def test_report_renders_in_chromium(demo_run, tmp_path):
    from scripts.render_report import FLAGS, chromium_binary

    chromium = chromium_binary()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    index = demo_run / "report" / "index.html"
    flags = [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count('class="thumb') >= 10  # the cluster galleries
    assert dom.count('class="figure"') >= 1  # the similarity histogram
    assert "kept" in dom and "Keyword" in dom and "Failures by type" in dom
    for rel in ("similarity_phash.png",):
        assert (index.parent / rel).stat().st_size > 5000
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2400", index.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20  # not a blank page: text, thumbnails and figures
    thumbs = list((index.parent / "thumbs").glob("*.jpg"))
    assert len(thumbs) >= 10


def test_run_json_counts_agree(demo_run):
    import pyarrow.dataset as ds

    run = json.loads((demo_run / "run.json").read_text())
    rows = ds.dataset(str(demo_run / "manifest"), format="parquet").count_rows()
    assert run["outputs"]["manifest"] == run["summary"]["keys"] == rows == 104
