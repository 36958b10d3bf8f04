"""The report: its tables on literals, and the demo run's page rendered in headless Chromium."""

import json

import numpy as np
import pytest

from pipeline.report import write_report
from pipeline.report_tables import _failure_table, _reason_table
from scripts.render_report import chromium_binary, dom_counts, dump_dom, screenshot
from transforms.write import read_table


def test_reason_table_counts_families_by_decision():
    manifest = [
        {"decision": "drop", "reasons": ["duplicate:phash"]},
        {"decision": "drop", "reasons": ["duplicate:phash", "memorized:probe"]},
        {"decision": "diversify", "reasons": ["trigger:word_trigger:a", "trigger:word_trigger:b", "full_duplication"]},
        {"decision": "diversify", "reasons": ["memorized:probe"]},
        {"decision": "keep", "reasons": []},
    ]
    rows = {r["reason"]: r for r in _reason_table(manifest)}
    assert rows["duplicate:phash"] == {"reason": "duplicate:phash", "total": 2, "keep": 0, "diversify": 0, "drop": 2}
    assert rows["memorized:probe"]["drop"] == 1 and rows["memorized:probe"]["diversify"] == 1
    assert rows["trigger:word_trigger"]["total"] == 1  # a sample counts once per family
    assert rows["(no reason: kept as is)"]["keep"] == 1


def test_failure_table_groups_by_stage_and_type():
    failures = [
        {"stage": "decode", "error_type": "corrupt_image", "message": "bad"},
        {"stage": "decode", "error_type": "corrupt_image", "message": "worse"},
        {"stage": "read", "error_type": "missing_caption", "message": None},
    ]
    assert [(f["stage"], f["error_type"], f["n"], f["example"]) for f in _failure_table(failures)] == [
        ("decode", "corrupt_image", 2, "bad"),
        ("read", "missing_caption", 1, ""),
    ]


def test_report_of_an_empty_run(tmp_path):
    """No clusters, scores or failures: the page still renders, with its empty-state lines."""
    info = {"job": "empty", "summary": {"keys": 0, "ok": 0, "failed": 0, "decisions": {}}, "config": {}}
    html = open(write_report(str(tmp_path), info)).read()
    assert "No duplicate clusters." in html and "No failures." in html and "No sample diversified." in html


def test_report_renders_in_chromium(demo_run, tmp_path):
    if chromium_binary() is None:
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    index = demo_run / "report" / "index.html"
    run = json.loads((demo_run / "run.json").read_text())
    dom = dump_dom(index)
    counts = dom_counts(dom)
    n_clusters = len(
        {r["cluster_id"] for r in _manifest_rows(demo_run) if r["cluster_size"] > 1 and r["status"] == "ok"}
    )
    assert counts["galleries"] == min(8, n_clusters) >= 5
    assert counts["thumbnails"] >= 3 * counts["galleries"]
    # one nearest-neighbour histogram per embedder with neighbours (phash, orb in the demo job),
    # similarity to representative, probe scores
    embedders = {r["embedder"] for r in read_table(str(demo_run / "neighbours")).to_pylist()}
    assert embedders >= {"phash"}
    assert counts["figures"] == len(embedders) + 2
    assert dom.count('class="thumb representative"') == counts["galleries"]  # the kept member marked
    for section in ('id="reasons"', "Keyword &rarr; cluster", "Keyword &rarr; object", "Failures by type"):
        assert section in dom or section.replace("&rarr;", "\u2192") in dom, section
    for decision, n in run["summary"]["decisions"].items():
        assert f'<div class="card {decision}"><b>{n}</b>' in dom

    from PIL import Image

    report = index.parent
    for name in ("similarity_phash.png", "similarity_to_representative.png", "probe_scores.png"):
        fig = np.asarray(Image.open(report / name).convert("L"), dtype=np.float32)
        assert fig.shape[1] >= 400 and fig.std() > 10, name  # drawn, not blank
    thumbs = sorted((report / "thumbs").glob("*.jpg"))
    assert len(thumbs) >= counts["thumbnails"] and all(
        np.asarray(Image.open(t).convert("L"), dtype=np.float32).std() > 3 for t in thumbs
    )
    shot = screenshot(index, tmp_path / "report.png", 1280, 3000)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (3000, 1280, 3)
    assert pixels.std() > 20  # text, thumbnails and figures, not a blank page
    bottom = pixels[1500:]
    assert bottom.std() > 20 and (np.abs(bottom[..., 0] - bottom[..., 2]) > 40).mean() > 0.01  # colour photos


def _manifest_rows(run_dir):
    from transforms.write import read_table

    return read_table(str(run_dir / "manifest")).to_pylist()


def test_report_header_warnings_sizes_and_every_cluster(demo_run):
    """Acceptance 4 on the demo run: the probe model named and flagged as the lab model, sizes and
    the keeper rule on cluster cards, every cluster in the table, triggers linked to clusters."""
    if chromium_binary() is None:
        pytest.skip("Debian's chromium is not installed")
    dom = dump_dom(demo_run / "report" / "index.html")
    header = dom[dom.index('id="run-header"') : dom.index("</header>")]
    assert "memlab" in header and "memorization probe" in header and "memsieve" in header
    assert 'class="warning"' in dom and "lab model" in dom
    assert "decoded <span" in dom and "original <span" in dom and "Kept copy (<code>dedup.keeper</code>" in dom
    n_clusters = len(
        {r["cluster_id"] for r in _manifest_rows(demo_run) if r["cluster_size"] > 1 and r["status"] == "ok"}
    )
    assert dom.count('<tr id="c-') == min(25, n_clusters)  # rendered by the page's script
    assert 'class="cluster-link"' in dom and 'href="#c-' in dom
    assert "What to do next" in dom and 'href="../blocklist.txt"' in dom and 'href="../manifest/"' in dom


def _synthetic_run(root, n_clusters: int, caption: str) -> dict:
    from schemas import arrow
    from transforms.write import write_rows

    rows = []
    for c in range(n_clusters):
        for m in range(2):
            key = f"{c:04d}{m}"
            rows.append(
                dict(
                    key=key,
                    shard="s",
                    url=f'http://x/{key}"><img src=x onerror=alert(1)>',
                    caption=caption,
                    sha256="",
                    status="ok",
                    decision="keep" if m == 0 else "drop",
                    reasons=[] if m == 0 else ["duplicate:phash"],
                    cluster_id=f"{c:04d}0",
                    cluster_size=2,
                    is_representative=m == 0,
                    width=10,
                    height=10,
                    duplication="",
                    trigger_codes=[],
                    probe_score=None,
                )
            )
    write_rows(str(root / "manifest" / "part-s.parquet"), rows, arrow.MANIFEST)
    decisions = {"keep": n_clusters, "drop": n_clusters}
    return {
        "job": "xss",
        "summary": {"keys": len(rows), "ok": len(rows), "failed": 0, "decisions": decisions},
        "config": {"probe": {"enabled": False}, "dedup": {"keeper": "earliest"}},
    }


def test_captions_and_urls_are_text_and_the_table_pages(tmp_path):
    """A caption holding <script> is shown as text, in the galleries and in the script-built table."""
    if chromium_binary() is None:
        pytest.skip("Debian's chromium is not installed")
    caption = '<script>document.title="pwned"</script></script><b>bold</b> & more'
    info = _synthetic_run(tmp_path, 60, caption)
    index = write_report(str(tmp_path), info)
    html = open(index, encoding="utf-8").read()
    assert '<script>document.title="pwned"' not in html and "onerror=alert(1)>" not in html
    dom = dump_dom(tmp_path / "report" / "index.html")
    assert "pwned" not in dom[dom.index("<title>") : dom.index("</title>")]
    assert "&lt;script&gt;document.title" in dom and "<b>bold</b>" not in dom
    assert dom.count('<tr id="c-') == 25 and "page 1 of 3 (60 clusters)" in dom  # 60 clusters, 25 a page
    data = json.loads(
        dom[
            dom.index('id="cluster-data">') + len('id="cluster-data">') : dom.index(
                "</script>", dom.index('id="cluster-data">')
            )
        ]
    )
    assert len(data) == 60 and data[0]["caption"] == caption  # every cluster reachable, caption intact
    assert "The memorization probe did not run" in dom and "the smallest key" in dom


def test_page_gathered_in_the_run_is_the_page_built_at_the_end(demo_run, tmp_path):
    """The run's page reads its tables inside the pipeline (``report_stage``: report/_parts.json,
    read once and removed); building the whole page after the run gives the same page."""
    import re
    import shutil

    from pipeline.report_stage import PARTS, gathered_parts, table_parts

    run = json.loads((demo_run / "run.json").read_text())
    assert run["counters"]["report"] == {"gathered": 1}  # the run's page took the gathered part
    assert not (demo_run / "report" / PARTS).exists()
    copy = tmp_path / "out"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("report", "run.json"))  # as at report time
    again = open(write_report(str(copy), run)).read()
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert stamp.sub("", again).replace(str(copy), str(demo_run)) == stamp.sub(
        "", (demo_run / "report" / "index.html").read_text()
    )
    assert sorted(p.name for p in (copy / "report").iterdir()) == sorted(
        p.name for p in (demo_run / "report").iterdir()
    )
    parts = table_parts(str(copy), run["input"]["shards"], run["config"], str(copy / "report"), True, 8)
    parts["failures"] = [{"stage": "planted", "error_type": "marker", "n": 1, "example": "from the parts file"}]
    (copy / "report" / PARTS).write_text(json.dumps(parts))
    page = open(write_report(str(copy), run)).read()  # the saved part is what the page shows, read once
    assert "from the parts file" in page and not (copy / "report" / PARTS).exists()
    (copy / "report" / PARTS).write_text("{not json")
    assert gathered_parts(str(copy / "report")) is None and not (copy / "report" / PARTS).exists()


def test_parts_step_leaves_the_page_to_the_end_when_it_fails(tmp_path, monkeypatch):
    import pipeline.report_stage as stage

    def broken(*args, **kwargs):
        raise RuntimeError("no figures today")

    monkeypatch.setattr(stage, "table_parts", broken)
    assert list(stage._write_parts(None, str(tmp_path), [], {}, ready=1)) == []
    assert not (tmp_path / "report" / stage.PARTS).exists()
