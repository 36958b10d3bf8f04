"""``write_blocklist_txt`` (columnar) writes the same bytes as the row-by-row definition: one
line a URL, control characters percent-encoded, each content-drop URL once in part order."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.blocklist import TSV_COLUMNS, _field, clean_url, sidecar, write_blocklist_txt
from schemas import arrow
from transforms.decide import CONTENT_CATEGORIES

ODD = [
    "http://x/a\nb\rc\x00d\x1b[31m\u2028e",
    "http://x/ünïcödé/图片.jpg",
    "http://x/space here\t\x7f\x85\u2029",
    None,
    "",
    "http://x/plain.jpg",
]


def _rows(part: int) -> list[dict]:
    rows = []
    for i in range(24):
        rows.append(
            {
                "url": ODD[(i + part) % len(ODD)] if i % 7 else f"http://x/{part}/{i}.jpg",
                "sha256": None if i % 5 == 0 else f"{i:064x}",
                "key": f"k{part}-{i:03d}\u00e9" if i % 4 == 0 else f"k{part}-{i:03d}",
                "reason": "duplicate:clip;memorized:probe" if i % 3 else "failed:read:bad\nline",
                "category": [None, "duplicate", "memorized", "dead_link", "unreadable", ""][i % 6],
                "kept_key": "k0-000" if i % 6 == 1 else None,
                "kept_url": ODD[i % len(ODD)] if i % 6 == 1 else None,
            }
        )
    return rows


def _reference(parts: list[list[dict]]) -> tuple[str, str, dict]:
    """The row-by-row definition the columnar writer must match."""
    seen, urls, tsv, counts = set(), [], ["\t".join(TSV_COLUMNS)], {}
    for rows in parts:
        for r in rows:
            category = r.get("category") or "unreadable"
            counts[category] = counts.get(category, 0) + 1
            tsv.append("\t".join(_field(r.get(c)) for c in TSV_COLUMNS))
            url = clean_url(r.get("url"))
            if url and category in CONTENT_CATEGORIES and url not in seen:
                seen.add(url)
                urls.append(url)
    return "".join(u + "\n" for u in urls), "\n".join(tsv) + "\n", sidecar(counts, len(urls))


def test_columnar_blocklist_files_equal_the_row_by_row_definition(tmp_path):
    parts = [_rows(p) for p in range(3)] + [[]]
    (tmp_path / "blocklist").mkdir()
    for p, rows in enumerate(parts):
        table = pa.Table.from_pylist(rows, schema=arrow.BLOCKLIST)
        pq.write_table(table, tmp_path / "blocklist" / f"part-{p:02d}.parquet")
    txt, tsv, meta = _reference(parts)
    assert write_blocklist_txt(str(tmp_path)) == meta["urls_in_blocklist_txt"] > 3
    assert (tmp_path / "blocklist.txt").read_bytes() == txt.encode()
    assert (tmp_path / "blocklist.tsv").read_bytes() == tsv.encode()
    assert json.loads((tmp_path / "blocklist.json").read_text()) == meta
    assert "%2029" in txt and "%2028" in tsv and "%0A" in tsv and "图片" in txt and "k0-000\u00e9" in tsv
    assert len(tsv.splitlines()) == 1 + sum(len(r) for r in parts)


def test_no_parts_writes_empty_files(tmp_path):
    assert write_blocklist_txt(str(tmp_path)) == 0
    assert (tmp_path / "blocklist.txt").read_bytes() == b""
    assert (tmp_path / "blocklist.tsv").read_text() == "\t".join(TSV_COLUMNS) + "\n"


def test_files_written_in_the_run_are_the_files_written_after_it(demo_run, tmp_path):
    """The run writes blocklist.txt, .tsv and .json inside the pipeline (``add_blocklist_files``,
    its URL count a counter); writing them again from ``blocklist/`` gives the same bytes."""
    import shutil

    from pipeline.blocklist import urls_published

    run = json.loads((demo_run / "run.json").read_text())
    assert urls_published(run["counters"]) == run["outputs"]["blocklist_urls"]
    assert urls_published({}) is None
    shutil.copytree(demo_run / "blocklist", tmp_path / "blocklist")
    assert write_blocklist_txt(str(tmp_path)) == run["outputs"]["blocklist_urls"]
    for name in ("blocklist.txt", "blocklist.tsv", "blocklist.json"):
        assert (tmp_path / name).read_bytes() == (demo_run / name).read_bytes(), name
