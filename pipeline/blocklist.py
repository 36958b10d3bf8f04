"""The published blocklist: ``blocklist.txt`` (content drops only), ``blocklist.tsv`` (every
dropped row with its category and, for duplicates, the copy that was kept) and the sidecar
``blocklist.json`` that describes both (format version, columns, categories, counts).

The ``blocklist/`` Parquet table is the source; these files are derived from it part by part
(in part order, rows by key) so two runs write identical bytes. Control characters in a URL
are percent-encoded: a URL can never inject a line.
"""

from __future__ import annotations

import hashlib
import json
import re

from transforms import fsio
from transforms.decide import CATEGORIES, CONTENT_CATEGORIES
from transforms.write import atomic_write_text

FORMAT_VERSION = "1"
TSV_COLUMNS = ("url", "category", "reason", "key", "sha256", "kept_key", "kept_url")
_CONTROL = re.compile("[\x00-\x20\x7f\x85\u2028\u2029]")  # control characters, space, line separators


def clean_url(url: str | None) -> str:
    """One line, no spaces or control characters (they are percent-encoded)."""
    return _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", url or "")


def _field(value) -> str:
    return _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", "" if value is None else str(value))


def _parts(out_dir: str) -> list[str]:
    folder = fsio.join(out_dir, "blocklist")
    if not fsio.isdir(folder):
        return []
    return sorted(fsio.join(folder, p) for p in fsio.listdir(folder) if p.endswith(".parquet"))


def sidecar(counts: dict[str, int], urls: int) -> dict:
    return {
        "format": "memsieve-blocklist",
        "version": FORMAT_VERSION,
        "files": {
            "blocklist.txt": "one URL a line (control characters percent-encoded), the dropped samples whose "
            f"content was judged ({', '.join(CONTENT_CATEGORIES)}); each URL once",
            "blocklist.tsv": "every dropped sample, tab-separated, the first line names the columns",
            "blocklist/": "the same rows as Parquet (schemas/arrow.py BLOCKLIST)",
        },
        "columns": list(TSV_COLUMNS),
        "categories": {
            "duplicate": "a copy of another sample that was kept (kept_key, kept_url name it)",
            "memorized": "the memorization probe flagged its caption",
            "dead_link": "img2dataset could not download it: nothing was judged (not in blocklist.txt)",
            "unreadable": "its image or caption could not be processed: nothing was judged (not in blocklist.txt)",
        },
        "published_categories": list(CONTENT_CATEGORIES),
        "rows_by_category": {c: counts.get(c, 0) for c in CATEGORIES},
        "urls_in_blocklist_txt": urls,
    }


def write_blocklist_txt(out_dir: str) -> int:
    """Write blocklist.txt, blocklist.tsv and blocklist.json from ``blocklist/``; returns the
    number of URLs in blocklist.txt."""
    import pyarrow.parquet as pq

    seen: set[bytes] = set()
    urls: list[str] = []
    tsv = ["\t".join(TSV_COLUMNS)]
    counts: dict[str, int] = {}
    for path in _parts(out_dir):
        with fsio.open_input(path) as f:
            rows = pq.read_table(f).to_pylist()
        for r in rows:
            category = r.get("category") or "unreadable"
            counts[category] = counts.get(category, 0) + 1
            tsv.append("\t".join(_field(r.get(c)) for c in TSV_COLUMNS))
            url = clean_url(r.get("url"))
            digest = hashlib.blake2b(url.encode(), digest_size=8).digest()
            if url and category in CONTENT_CATEGORIES and digest not in seen:
                seen.add(digest)
                urls.append(url)
    atomic_write_text(fsio.join(out_dir, "blocklist.txt"), "".join(u + "\n" for u in urls))
    atomic_write_text(fsio.join(out_dir, "blocklist.tsv"), "\n".join(tsv) + "\n")
    meta = sidecar(counts, len(urls))
    atomic_write_text(fsio.join(out_dir, "blocklist.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return len(urls)
