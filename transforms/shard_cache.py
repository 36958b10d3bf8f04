"""Per-shard cache of expensive results, so a killed run restarts without redoing finished shards.

An entry is a folder ``CACHE/<stage>/<shard>-<fingerprint>/`` of Parquet tables plus a
``done.json`` written last (locally the tables are assembled under a temporary name and renamed
first; on an object store ``done.json`` is one PUT), so a crash never leaves an entry that looks
complete. The fingerprint is content-based: the tar's
bytes and its img2dataset sidecars (``.parquet``, ``_stats.json``; a sidecar written after an
earlier run changes it), the shard identity the cached rows carry, and the stage's settings
(limits, model, versions). Never name + size + mtime. No pickle: rows are Parquet.

Entry names are ``<shard>-<content:16><settings:8>``: incremental mode
(``transforms.incremental``) finds the entries of a listed shard from its content alone.
"""

from __future__ import annotations

import hashlib
import json
import os

from transforms import fsio

SIDECARS = (".parquet", "_stats.json")


def sidecar_paths(path: str) -> list[str]:
    from transforms.sidecar import tar_stem

    return [tar_stem(path) + s for s in SIDECARS]


def _path_hash(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:6]


def content_fingerprint(path: str) -> str:
    """16 hex digits over the tar's and its sidecars' content fingerprints and its shard name."""
    from transforms.read_shards import shard_name

    parts = [shard_name(path), fsio.fingerprint(path)] + [fsio.fingerprint(p) for p in sidecar_paths(path)]
    if parts[1] == "absent":  # unreadable: never reuse a cache for it
        return "unreadable" + _path_hash(path)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def fingerprint(path: str, settings: dict) -> str:
    try:
        content = content_fingerprint(path)
    except OSError:  # unreadable now: a fresh key that matches no entry
        content = "unreadable" + _path_hash(path)
    return content + settings_fingerprint(settings)


def entry_dir(cache_dir: str, stage: str, shard: str, fp: str) -> str:
    from transforms.write import safe_part_name

    return fsio.join(cache_dir, stage, f"{safe_part_name(shard)}-{fp}")


def entries_for(cache_dir: str, stage: str, path: str) -> list[str]:
    """Finished entries of one shard's current content, whatever the settings."""
    from transforms.read_shards import shard_name
    from transforms.write import safe_part_name

    prefix = f"{safe_part_name(shard_name(path))}-{content_fingerprint(path)}"
    folder = fsio.join(cache_dir, stage)
    names = [n for n in fsio.listdir(folder) if n.startswith(prefix) and len(n) == len(prefix) + 8]
    return [fsio.join(folder, n) for n in names if fsio.isfile(fsio.join(folder, n, "done.json"))]


def load(entry: str) -> dict[str, list[dict]] | None:
    """The cached tables of an entry, or None when it is absent or incomplete."""
    import pyarrow.parquet as pq

    done = fsio.join(entry, "done.json")
    try:
        if not fsio.isfile(done):
            return None
        tables = json.loads(fsio.read_text(done))["tables"]
        out = {}
        for name in tables:
            with fsio.open_input(fsio.join(entry, f"{name}.parquet")) as f:
                out[name] = pq.read_table(f).to_pylist()
        return out
    except (OSError, ValueError, KeyError):
        return None  # damaged: recompute


def store(entry: str, tables: dict[str, tuple[list[dict], object]]) -> None:
    """tables: name -> (rows, arrow schema). Appears complete only once ``done.json`` exists, and
    ``done.json`` is written last, only ever inside the entry's final folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    remote = fsio.is_remote(entry)
    folder = entry if remote else f"{entry}.tmp-{os.getpid()}"
    fsio.remove(folder)
    fsio.makedirs(folder)
    for name, (rows, schema) in tables.items():
        with fsio.atomic_writer(fsio.join(folder, f"{name}.parquet")) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
    if not remote:
        fsio.remove(entry)
        fsio.rename(folder, entry)
    fsio.write_text(fsio.join(entry, "done.json"), json.dumps({"tables": sorted(tables)}))


def clear_temporaries(cache_dir: str) -> None:
    """Half-built local entries a killed run left behind (``*.tmp-<pid>``)."""
    for stage in fsio.listdir(cache_dir):
        folder = fsio.join(cache_dir, stage)
        for name in fsio.listdir(folder):
            if ".tmp-" in name:
                fsio.remove(fsio.join(folder, name))
