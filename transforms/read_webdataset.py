"""The reader of webdataset .tar shards: ``ProcessShards`` (read, decode, hash, cached per shard).

A reader module has ``check(cfg)`` (settings this layout cannot honour -> ConfigError naming the
field) and ``read(p, cfg, inputs, out_dir) -> dict`` (see ``pipeline.graph.read_input``).
"""

from __future__ import annotations

import os

import apache_beam as beam

from transforms.key_batches import n_buckets
from transforms.process_shards import ProcessShards, ShardSettings, shard_path_element
from transforms.read_shards import ReadLimits


def read_limits(cfg) -> ReadLimits:
    r = cfg.read
    return ReadLimits(
        max_image_bytes=r.max_image_bytes,
        max_caption_bytes=r.max_caption_bytes,
        require_caption=r.require_caption,
        image_extensions=tuple(r.image_extensions),
        max_members_per_key=r.max_members_per_key,
        max_json_bytes=r.max_json_bytes,
    )


def check(cfg) -> None:
    """Every setting applies to shards."""


def describe(shards: list[str]) -> dict:
    return {"format": "webdataset", "shards": shards, "n_shards": len(shards)}


def read(p: beam.Pipeline, cfg, shards: list[str], out_dir: str) -> dict:
    settings = ShardSettings(
        limits=read_limits(cfg),
        max_pixels=cfg.read.max_image_pixels,
        phash=cfg.dedup.phash.enabled,
        pixel_hash=cfg.dedup.exact and cfg.dedup.exact_pixels,
        cache_dir=(cfg.run.cache_dir or os.path.join(out_dir, "cache")) if cfg.run.cache else None,
        emit_samples=cfg.dedup.clip.enabled or cfg.dedup.sscd.enabled,
        orb=cfg.dedup.orb if cfg.dedup.orb.enabled else None,
        max_decoded_bytes=cfg.read.max_decoded_bytes,
        debug_sleep_s=cfg.run.debug_sleep_per_shard_s,
    )
    paths = p | "ShardPaths" >> beam.Create([shard_path_element(s) for s in sorted(shards)])
    buckets = n_buckets(len(shards))
    out = dict(paths | "ProcessShards" >> ProcessShards(settings, key_buckets=buckets))
    out["buckets"] = buckets
    out["pixels"] = True
    out["input"] = describe(shards)
    return out
