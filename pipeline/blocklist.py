"""The published blocklist: ``blocklist.txt`` (content drops only), ``blocklist.tsv`` (every
dropped row with its category and, for duplicates, the copy that was kept) and the sidecar
``blocklist.json`` that describes both (format version, columns, categories, counts).

The ``blocklist/`` Parquet table is the source; these files are derived from it part by part
(in part order, rows by key) so two runs write identical bytes. Control characters in a URL
are percent-encoded: a URL can never inject a line.
"""

from __future__ import annotations

import json
import re

from transforms import fsio
from transforms.decide import CATEGORIES, CONTENT_CATEGORIES
from transforms.write import atomic_write_text

FORMAT_VERSION = "1"
TSV_COLUMNS = ("url", "category", "reason", "key", "sha256", "kept_key", "kept_url")
_CONTROL = re.compile("[\x00-\x20\x7f\x85\u2028\u2029]")  # control characters, space, line separators
_CONTROL_RE2 = r"[\x00-\x20\x7f\x{85}\x{2028}\x{2029}]"  # the same class for pyarrow.compute (RE2)


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


def _escaped(values):
    """A string column with nulls as "" and control characters percent-encoded (as ``_field``).
    The regex runs only on the few values that a vectorised check finds such a character in."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = pc.fill_null(pc.cast(values, pa.string()), "")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], pa.string())
    hit = pc.fill_null(pc.match_substring_regex(col, _CONTROL_RE2), False).to_numpy(zero_copy_only=False)
    if not hit.any():
        return col
    fixed = [_field(v) for v in pc.filter(col, pa.array(hit)).to_pylist()]
    return pc.replace_with_mask(col, pa.array(hit), pa.array(fixed, pa.string()))


def _lines_bytes(lines) -> bytes:
    """Each value followed by a newline, as UTF-8 bytes (read straight from the Arrow buffers)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(lines) == 0:
        return b""
    arr = pc.cast(pc.binary_join_element_wise(lines, "", "\n"), pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    return arr.buffers()[2][int(offsets[0]) : int(offsets[-1])].to_pybytes()


def _part_rows(table, counts: dict[str, int]):
    """One blocklist part -> (its blocklist.tsv lines as bytes, its content-drop URLs)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    cols = {c: (table.column(c) if c in table.column_names else pa.nulls(n, pa.string())) for c in TSV_COLUMNS}
    fields = {c: _escaped(v) for c, v in cols.items()}
    raw = pc.fill_null(pc.cast(cols["category"], pa.string()), "")
    category = pc.if_else(pc.equal(raw, ""), "unreadable", raw)
    for entry in pc.value_counts(category).to_pylist():
        counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    tsv = _lines_bytes(pc.binary_join_element_wise(*(fields[c] for c in TSV_COLUMNS), "\t"))
    url = fields["url"]
    content = pc.and_(pc.is_in(category, pa.array(CONTENT_CATEGORIES)), pc.not_equal(url, ""))
    return tsv, pc.filter(url, content)


def write_blocklist_txt(out_dir: str) -> int:
    """Write blocklist.txt, blocklist.tsv and blocklist.json from ``blocklist/`` (columnar, part
    by part); returns the number of URLs in blocklist.txt (each content-drop URL once, first
    occurrence first)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    urls = []
    with fsio.atomic_writer(fsio.join(out_dir, "blocklist.tsv")) as tsv:
        tsv.write(("\t".join(TSV_COLUMNS) + "\n").encode())
        for path in _parts(out_dir):
            with fsio.open_input(path) as f:
                part = pq.read_table(f)
            lines, content = _part_rows(part, counts)
            tsv.write(lines)
            urls.append(content)
    unique = pc.unique(pa.chunked_array(urls, pa.string())) if urls else pa.array([], pa.string())
    with fsio.atomic_writer(fsio.join(out_dir, "blocklist.txt")) as txt:
        txt.write(_lines_bytes(unique))
    meta = sidecar(counts, len(unique))
    atomic_write_text(fsio.join(out_dir, "blocklist.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return len(unique)


COUNTER = ("blocklist", "urls_in_blocklist_txt")  # the run's Beam counter of the files written in it


def _files_step(_, out_dir: str, ready: int):
    """-> the written blocklist.json path, once the ``blocklist/`` parts are (``ready``: counted)."""
    import apache_beam as beam

    n = write_blocklist_txt(out_dir)
    beam.metrics.Metrics.counter(*COUNTER).inc(n)
    yield fsio.join(out_dir, "blocklist.json")


def add_blocklist_files(written, out_dir: str):
    """Write blocklist.txt, .tsv and .json inside the pipeline, once ``written`` (the paths of
    the ``blocklist/`` writer) is complete: beside the stages still running, instead of after
    the run. -> the written path (``urls_published`` reads the count back from the counter)."""
    import apache_beam as beam

    ready = written | "BlocklistReady" >> beam.combiners.Count.Globally()
    return (
        written.pipeline
        | "BlocklistStart" >> beam.Create([None])
        | "BlocklistFiles" >> beam.FlatMap(_files_step, out_dir=out_dir, ready=beam.pvalue.AsSingleton(ready))
    )


def urls_published(counters: dict) -> int | None:
    """The run's ``runinfo.beam_counters`` -> the URLs in the blocklist.txt written inside the
    run, or None where it was not (then ``write_blocklist_txt`` writes the files after the run)."""
    return counters.get(COUNTER[0], {}).get(COUNTER[1])
