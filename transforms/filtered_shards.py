"""Filtered webdataset shards: only the kept samples, with the diversified captions in their json.

For training teams that want shards rather than a manifest. Each input shard becomes
``OUTPUT/filtered/<shard>.tar`` holding the samples whose decision is keep or diversify; the
original caption stays in ``.txt``, and the json gains ``memsieve``: decision, reasons and, for
diversified samples, the alternative captions with their strategies, the per-strategy train-time
probability and the Gaussian-noise sigma. Members are copied byte for byte (no re-encoding),
written under a temporary name, then renamed; the same decisions give byte-identical shards.

``filter_with_manifest`` does the same on the fly over existing shards (docs/filtering.md).
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile

from transforms import fsio
from transforms.read_shards import is_unsafe_name, shard_name, split_member_name
from transforms.write import read_table, safe_part_name

KEEP_DECISIONS = ("keep", "diversify")


def kept_by_shard(out_dir: str, diversify_cfg=None) -> dict[str, dict[str, dict]]:
    """shard -> key -> the ``memsieve`` json block, for the kept samples of a run's manifest."""
    manifest = read_table(fsio.join(out_dir, "manifest"))
    if manifest is not None:
        manifest = manifest.select(["key", "shard", "status", "decision", "reasons"])
    div = read_table(fsio.join(out_dir, "diversify"))
    alts = {r["key"]: r for r in (div.to_pylist() if div is not None else [])}
    training = {}
    if diversify_cfg is not None:
        training = {"train_probability": diversify_cfg.train_probability}
    out: dict[str, dict[str, dict]] = {}
    for r in manifest.to_pylist() if manifest is not None else []:
        if r["status"] != "ok" or r["decision"] not in KEEP_DECISIONS:
            continue
        d = alts.get(r["key"], {})
        block = {
            "decision": r["decision"],
            "reasons": list(r["reasons"] or []),
            "alternatives": list(d.get("alternatives") or []),
            "strategies": list(d.get("alternative_strategies") or []),
        }
        if d:
            block.update(training, gaussian_noise_sigma=d.get("gaussian_noise_sigma"))
        out.setdefault(r["shard"], {})[r["key"]] = block
    return out


def _read_kept(path: str, kept: dict[str, dict]) -> dict[str, dict]:
    """The kept samples of one shard as webdataset dicts (a truncated shard: what precedes the break)."""
    samples: dict[str, dict] = {}
    if not kept:  # nothing to copy: never open it (a FIFO or an unreadable shard)
        return samples
    try:  # streamed through the filesystem layer: local, s3:// and gs:// shards, gzip or not
        with fsio.open_input(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                split = split_member_name(m.name) if m.isfile() and not is_unsafe_name(m.name) else None
                if not split or split[0] not in kept:
                    continue
                sample = samples.setdefault(split[0], {"__key__": split[0]})
                if split[1] not in sample:  # a repeated key: the first occurrence is the one kept
                    sample[split[1]] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError):
        pass  # the manifest already records what a damaged shard lost
    return samples


def _with_block(sample: dict, block: dict) -> dict:
    try:
        meta = json.loads(sample.get("json") or b"{}")
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    meta["memsieve"] = block
    return dict(sample, json=json.dumps(meta, sort_keys=True).encode())


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same decisions give the same bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def filter_shard(path: str, kept: dict[str, dict], out_path: str) -> int:
    """Copy the kept samples of one shard to ``out_path``; returns how many were written.

    Written in webdataset's layout (``<key>.<ext>`` members, a sample's members together) with
    the standard library's tarfile: importing webdataset would import torch, seconds a re-decide
    should not pay."""
    samples = _read_kept(path, kept)
    with fsio.atomic_writer(out_path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as sink:
        for key in sorted(samples):
            sample = _with_block(samples[key], kept[key])
            for ext in sorted(e for e in sample if not e.startswith("__")):
                _add_member(sink, f"{key}.{ext}", sample[ext])
    return len(samples)


def write_filtered_shards(out_dir: str, shard_paths: list[str], diversify_cfg=None) -> int:
    """``OUTPUT/filtered/<shard>.tar`` for every input shard; returns the samples written."""
    kept = kept_by_shard(out_dir, diversify_cfg)
    folder = fsio.join(out_dir, "filtered")
    fsio.makedirs(folder)
    total = 0
    for path, rel in zip(shard_paths, _relative_names(shard_paths), strict=True):
        target = fsio.join(folder, *rel.split(os.sep))
        total += filter_shard(path, kept.get(shard_name(path), {}), target)
    return total


def _relative_names(paths: list[str]) -> list[str]:
    """``filtered/`` mirrors the inputs' paths below their common folder (``a/00000.tar`` and
    ``b/00000.tar`` stay apart; ``x.tar.gz`` becomes ``x.tar``, it is written uncompressed);
    remote or odd paths fall back to the shard identity."""
    from transforms.sidecar import tar_stem

    local = [p for p in paths if "://" not in p]
    if paths and len(local) == len(paths):
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        rels = [tar_stem(os.path.relpath(os.path.abspath(p), root)) + ".tar" for p in paths]
        if all(not r.startswith("..") for r in rels) and len(set(rels)) == len(rels):
            return rels
    return [f"{safe_part_name(shard_name(p))}.tar" for p in paths]


def _block_for(kept: dict[str, dict[str, dict]], sample: dict) -> dict | None:
    """The sample's ``memsieve`` block, matched by its shard (from ``__url__``) and key."""
    key = sample.get("__key__")
    if sample.get("__url__"):
        return kept.get(shard_name(sample["__url__"]), {}).get(key)
    return next((keys[key] for keys in kept.values() if key in keys), None)


def _keep_sample(kept: dict[str, dict[str, dict]], sample: dict) -> bool:
    return _block_for(kept, sample) is not None


def _attach_block(kept: dict[str, dict[str, dict]], sample: dict) -> dict:
    return _with_block(sample, _block_for(kept, sample))


def filter_with_manifest(urls, run_dir: str, **webdataset_args):
    """A ``webdataset.WebDataset`` over existing shards that yields only the samples a run kept
    (matched by shard name and ``__key__``), their json carrying the ``memsieve`` block."""
    import webdataset as wds

    kept = kept_by_shard(run_dir)
    webdataset_args.setdefault("shardshuffle", False)
    return (
        wds.WebDataset(urls, **webdataset_args)
        .select(functools.partial(_keep_sample, kept))
        .map(functools.partial(_attach_block, kept))
    )
