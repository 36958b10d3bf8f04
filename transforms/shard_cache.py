"""Per-shard cache of expensive results, so a killed run restarts without redoing finished shards.

An entry is a folder ``CACHE/<stage>/<shard>-<fingerprint>/`` of Parquet tables plus a
``done.json`` written last; the folder is assembled under a temporary name and renamed, so a
crash never leaves an entry that looks complete. The fingerprint covers the shard file (path,
size, modification time) and the stage's settings: a changed shard or config misses the cache.
No pickle: rows are Parquet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil


def fingerprint(path: str, settings: dict) -> str:
    from apache_beam.io.filesystems import FileSystems

    try:
        meta = FileSystems.match([path])[0].metadata_list[0]
        stat = f"{meta.size_in_bytes}:{meta.last_updated_in_seconds}"
    except Exception:  # unreadable: never reuse a cache for it
        stat = "unreadable"
    blob = json.dumps({"path": path, "stat": stat, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_dir(cache_dir: str, stage: str, shard: str, fp: str) -> str:
    from transforms.write import safe_part_name

    return os.path.join(cache_dir, stage, f"{safe_part_name(shard)}-{fp}")


def load(entry: str) -> dict[str, list[dict]] | None:
    """The cached tables of an entry, or None when it is absent or incomplete."""
    import pyarrow.parquet as pq

    done = os.path.join(entry, "done.json")
    if not os.path.isfile(done):
        return None
    try:
        with open(done, encoding="utf-8") as f:
            tables = json.load(f)["tables"]
        return {name: pq.read_table(os.path.join(entry, f"{name}.parquet")).to_pylist() for name in tables}
    except (OSError, ValueError, KeyError):
        return None  # damaged: recompute


def store(entry: str, tables: dict[str, tuple[list[dict], object]]) -> None:
    """tables: name -> (rows, arrow schema). Written atomically as one folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = f"{entry}.tmp-{os.getpid()}"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for name, (rows, schema) in tables.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(tmp, f"{name}.parquet"))
    with open(os.path.join(tmp, "done.json"), "w", encoding="utf-8") as f:
        json.dump({"tables": sorted(tables)}, f)
    if os.path.isdir(entry):
        shutil.rmtree(entry)
    os.replace(tmp, entry)
