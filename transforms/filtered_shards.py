"""Filtered webdataset shards: only the kept samples, with the diversified captions in their json.

For training teams that want shards rather than a manifest. Each input shard becomes
``OUTPUT/filtered/<shard>.tar`` holding the samples whose decision is keep or diversify; the
original caption stays in ``.txt``, and the json gains ``memsieve``: decision, reasons and, for
diversified samples, the alternative captions with their strategies. Members are copied byte for
byte (no re-encoding). Written with webdataset's ``TarWriter`` under a temporary name, then renamed.
"""

from __future__ import annotations

import json
import os
import tarfile

from transforms.read_shards import shard_name, split_member_name
from transforms.write import read_table, safe_part_name

KEEP_DECISIONS = ("keep", "diversify")


def kept_by_shard(out_dir: str) -> dict[str, dict[str, dict]]:
    """shard -> key -> {"decision", "reasons", "alternatives", "strategies"} for kept samples."""
    manifest = read_table(os.path.join(out_dir, "manifest"))
    div = read_table(os.path.join(out_dir, "diversify"))
    alts = {r["key"]: r for r in (div.to_pylist() if div is not None else [])}
    out: dict[str, dict[str, dict]] = {}
    for r in manifest.to_pylist() if manifest is not None else []:
        if r["status"] == "ok" and r["decision"] in KEEP_DECISIONS:
            d = alts.get(r["key"], {})
            out.setdefault(r["shard"], {})[r["key"]] = {
                "decision": r["decision"],
                "reasons": list(r["reasons"]),
                "alternatives": list(d.get("alternatives") or []),
                "strategies": list(d.get("alternative_strategies") or []),
            }
    return out


def filter_shard(path: str, kept: dict[str, dict], out_path: str) -> int:
    """Copy the kept samples of one shard to ``out_path``; returns how many were written."""
    import webdataset as wds

    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                split = split_member_name(m.name) if m.isfile() else None
                if not split or split[0] not in kept:
                    continue
                if split[0] not in samples:
                    samples[split[0]] = {"__key__": split[0]}
                    order.append(split[0])
                samples[split[0]][split[1]] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError):
        pass  # a truncated shard: its readable samples are still written
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with wds.TarWriter(tmp) as sink:
        for key in sorted(order):
            sample = samples[key]
            meta = json.loads(sample.get("json", b"{}") or b"{}")
            meta["memsieve"] = kept[key]
            sample["json"] = json.dumps(meta, sort_keys=True).encode()
            sink.write(sample)
    os.replace(tmp, out_path)
    return len(order)


def write_filtered_shards(out_dir: str, shard_paths: list[str]) -> int:
    kept = kept_by_shard(out_dir)
    folder = os.path.join(out_dir, "filtered")
    os.makedirs(folder, exist_ok=True)
    total = 0
    for path in shard_paths:
        name = shard_name(path)
        total += filter_shard(path, kept.get(name, {}), os.path.join(folder, f"{safe_part_name(name)}.tar"))
    return total
