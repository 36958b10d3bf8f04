"""Read, decode and hash whole shards in one step, cached per shard.

The per-sample work that needs pixels (decoding, the exact-pixel digest, perceptual hashes)
happens right where the shard is read, so image bytes never cross a shuffle, and each finished
shard's results are cached (``transforms.shard_cache``): a run killed mid-way and started again
reloads finished shards instead of decoding them again. Samples themselves (with image bytes)
are emitted only when a later stage needs pixels (the CLIP embedder).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa

from pipeline import progress
from schemas import arrow
from schemas.elements import Failure, Sample, SampleInfo
from transforms import shard_cache, sidecar
from transforms.decode import DECODE_VERSION, DecodeError, decode_image, pixel_digest
from transforms.key_batches import RepeatedKeys
from transforms.read_shards import ReadLimits, duplicate_key_failures, iter_shard, shard_name

log = logging.getLogger(__name__)
PROGRESS_STEP = 32

INFO_SCHEMA = arrow.INFO_BATCH
FAILURE_SCHEMA = pa.schema([(f.name, pa.string()) for f in dataclasses.fields(Failure)])
CODE_SCHEMA = pa.schema([("key", pa.string()), ("codes", pa.binary())])
ORB_SCHEMA = pa.schema([("key", pa.string()), ("features", pa.binary())])
KEY_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string())])
SUMMARY_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("path", pa.string()),
        ("members", pa.int64()),
        ("keys", pa.int64()),
        ("sidecar_rows", pa.int64()),
        ("truncated", pa.bool_()),
        ("events", pa.list_(pa.string())),
    ]
)


@dataclasses.dataclass(frozen=True)
class ShardSettings:
    limits: ReadLimits
    max_pixels: int
    phash: bool
    pixel_hash: bool
    cache_dir: str | None
    emit_samples: bool = False
    max_decoded_bytes: int = 0  # 0: transforms.decode's default (bit depth counted)
    debug_sleep_s: float = 0.0  # tests only: make a shard slow so a run can be killed mid-way
    orb: Any = None  # pipeline.config.OrbConfig: ORB features computed (and cached) with the decode

    def cache_key(self) -> dict:
        from transforms import phash

        return {
            "limits": dataclasses.asdict(self.limits),
            "max_pixels": self.max_pixels,
            "phash": self.phash,
            "phash_version": (phash.BITS, phash.ROWS, phash.HASH_VERSION) if self.phash else None,
            "pixel_hash": self.pixel_hash,
            "decode_version": DECODE_VERSION,
            "max_decoded_bytes": self.max_decoded_bytes,
            "orb": self.orb.model_dump() if self.orb is not None else None,
        }


def decode_sample(
    sample: Sample, settings: ShardSettings, hasher, sizes: dict | None = None, extras: dict | None = None
) -> tuple[SampleInfo | Failure, bytes | None]:
    """Decode one sample -> its SampleInfo (sizes, digests, notes) and phash codes, or a Failure.

    The original size comes from the sample's json, else from the sidecar (``sizes``)."""
    notes: list[str] = []
    try:
        img = decode_image(sample.image, sample.image_ext, settings.max_pixels, notes, settings.max_decoded_bytes)
    except DecodeError as exc:
        return Failure(
            sample.key,
            sample.shard,
            "decode",
            exc.error_type,
            str(exc)[:500],
            sample.url,
            sample.caption,
            sample.sha256,
        ), None
    original = _original_size(sample, sizes)
    info = SampleInfo(
        sample.key,
        sample.shard,
        sample.url,
        sample.caption,
        sample.sha256,
        pixel_digest(img) if settings.pixel_hash else "",
        img.width,
        img.height,
        sample.meta_json,
        original_width=original[0],
        original_height=original[1],
        image_bytes=len(sample.image),
        notes=";".join(notes),
    )
    if extras is not None and settings.orb is not None:  # local features: transforms/local_features.py
        from transforms.local_features import extract_features

        extras["orb"] = extract_features(img, settings.orb).to_bytes()
    return info, (hasher(img).tobytes() if hasher is not None else None)


def _original_size(sample: Sample, sizes: dict | None) -> tuple[int, int]:
    try:
        meta = json.loads(sample.meta_json or "{}")
    except ValueError:
        meta = {}
    size = sidecar.original_size(meta if isinstance(meta, dict) else {})
    if not size[0] and sizes:
        size = sizes.get(sidecar.key_id(sample.key), (0, 0))
    return size


def _row(record) -> dict:
    """A flat frozen dataclass (SampleInfo, Failure) -> its fields as a dict (``asdict`` without
    the deep copy: the values are strings and numbers)."""
    return dict(record.__dict__)


def shard_path_element(path: str) -> str | bytes:
    """A shard path as a pipeline element: a name that is not UTF-8 (surrogate escapes, which no
    str coder accepts) travels as its bytes; ProcessShardFn turns it back into the same path."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


class ProcessShardFn(beam.DoFn):
    """Shard path -> one SampleInfo table (main), and tagged codes, failures, keys, shards, samples."""

    def __init__(self, settings: ShardSettings):
        self.settings = settings

    def setup(self):
        self.hasher = None
        if self.settings.phash:
            from transforms.phash import compute_hashes

            self.hasher = compute_hashes
        self.hits = beam.metrics.Metrics.counter("cache", "shard_hits")
        self.misses = beam.metrics.Metrics.counter("cache", "shard_misses")
        self.decoded = beam.metrics.Metrics.counter("decode", "decoded")

    def process(self, path: str | bytes) -> Iterator:
        if isinstance(path, bytes):  # a file name that is not UTF-8 travels as bytes (see shard_path_element)
            path = os.fsdecode(path)
        s = self.settings
        entry = None
        if s.cache_dir and not s.emit_samples:
            # the fingerprint covers the tar's and its sidecars' content (transforms.shard_cache)
            fp = shard_cache.fingerprint(path, s.cache_key())
            entry = shard_cache.entry_dir(s.cache_dir, "shards", shard_name(path), fp)
            cached = shard_cache.load(entry)
            if cached is not None:
                self.hits.inc()
                progress.advance("samples decoded", len(cached["infos"]))  # ready, as if decoded
                log.info("shard %s: reused from the cache", shard_name(path))
                yield from self._emit(cached)
                return
        self.misses.inc()
        tables = self._compute(path)
        if s.debug_sleep_s:
            time.sleep(s.debug_sleep_s)
        if entry is not None:
            shard_cache.store(
                entry,
                {
                    "infos": (tables["infos"], INFO_SCHEMA),
                    "failures": (tables["failures"], FAILURE_SCHEMA),
                    "codes": (tables["codes"], CODE_SCHEMA),
                    "keys": (tables["keys"], KEY_SCHEMA),
                    "summary": (tables["summary"], SUMMARY_SCHEMA),
                    "orb": (tables["orb"], ORB_SCHEMA),
                },
            )
        yield from self._emit(tables)

    def _compute(self, path: str) -> dict[str, list]:
        tables: dict[str, list] = {k: [] for k in ("infos", "failures", "codes", "keys", "summary", "samples", "orb")}
        sizes: dict = {}
        decoded = 0  # progress is told in steps of PROGRESS_STEP samples, not per sample
        for item in iter_shard(path, self.settings.limits, sizes):
            if isinstance(item, dict):
                tables["summary"].append(item)
            elif isinstance(item, Failure):
                tables["failures"].append(_row(item))
                if item.stage == "read" and item.error_type not in ("truncated_tar", "missing_from_shard"):
                    # keys the tar itself held (sidecar-only rows are not repeats of anything)
                    tables["keys"].append({"key": item.key, "shard": item.shard})
            else:
                tables["keys"].append({"key": item.key, "shard": item.shard})
                extras: dict = {}
                result, codes = decode_sample(item, self.settings, self.hasher, sizes, extras)
                if isinstance(result, Failure):
                    tables["failures"].append(_row(result))
                    continue
                decoded += 1
                if decoded % PROGRESS_STEP == 0:
                    progress.advance("samples decoded", PROGRESS_STEP)
                tables["infos"].append(_row(result))
                if codes is not None:
                    tables["codes"].append({"key": item.key, "codes": codes})
                if "orb" in extras:
                    tables["orb"].append({"key": item.key, "features": extras["orb"]})
                if self.settings.emit_samples:
                    tables["samples"].append(item)
        self.decoded.inc(decoded)
        if decoded % PROGRESS_STEP:
            progress.advance("samples decoded", decoded % PROGRESS_STEP)
        return tables

    def _emit(self, tables: dict[str, list]) -> Iterator:
        beam.metrics.Metrics.counter("read", "shards").inc()
        progress.advance("shards")
        if tables["infos"]:  # one info batch per shard, not one element per sample
            yield pa.Table.from_pylist(tables["infos"], schema=INFO_SCHEMA)
        for row in tables["failures"]:
            yield beam.pvalue.TaggedOutput("failures", Failure(**row))
        for row in tables["codes"]:
            yield beam.pvalue.TaggedOutput("codes", (row["key"], row["codes"]))
        if tables["keys"]:
            yield beam.pvalue.TaggedOutput("keys", [(row["key"], row["shard"]) for row in tables["keys"]])
        for row in tables["summary"]:
            yield beam.pvalue.TaggedOutput("shards", row)
        for row in tables.get("orb", []):
            yield beam.pvalue.TaggedOutput("orb", (row["key"], row["features"]))
        for sample in tables.get("samples", []):
            yield beam.pvalue.TaggedOutput("samples", sample)


class ProcessShards(beam.PTransform):
    """Shard paths -> {"info_batches" (one SampleInfo table per shard), "codes", "failures",
    "moved", "shards", "samples", "orb"}; cross-shard duplicate keys are reported as
    ``duplicate_key`` failures (each shard's keys travel as one list per hash bucket), and
    ``moved`` names the (shard, key) occurrences that are not the key's first shard."""

    def __init__(self, settings: ShardSettings, key_buckets: int = 16):
        super().__init__()
        self.settings = settings
        self.key_buckets = key_buckets

    def expand(self, paths):
        from transforms.outputs import multi_output

        shuffled = paths | "Reshuffle" >> beam.Reshuffle()
        out = multi_output(
            shuffled,
            "ProcessShard",
            ProcessShardFn(self.settings),
            ["failures", "codes", "keys", "shards", "samples", "orb"],
            "infos",
        )
        repeated = out["keys"] | "RepeatedKeys" >> RepeatedKeys(duplicate_key_failures, str, self.key_buckets)
        failures = (out["failures"], repeated["failures"]) | "MergeFailures" >> beam.Flatten()
        return {
            "info_batches": out["infos"],
            "moved": repeated["moved"],
            "codes": out["codes"],
            "failures": failures,
            "shards": out["shards"],
            "samples": out["samples"],
            "orb": out["orb"],
        }
