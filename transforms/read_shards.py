"""Stream img2dataset / webdataset shards into samples, with a dead letter for bad ones.

A shard is read member by member (``tarfile`` in stream mode over Beam's filesystems, so
local paths, gs:// and s3:// all work when their extras are installed). Members are grouped by
webdataset key; a group becomes a ``Sample`` or a ``Failure`` with a specific error type.
The img2dataset ``.parquet`` sidecar is read too, so that rows it recorded as failed (never in
the tar) and rows lost to a truncated tar still reach the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import apache_beam as beam

from pipeline import progress
from schemas.elements import Failure, Sample

log = logging.getLogger(__name__)

SAMPLES = "samples"
FAILURES = "failures"
SHARD_EVENTS = "shard_events"


@dataclass(frozen=True)
class ReadLimits:
    max_image_bytes: int = 32 * 1024 * 1024
    max_caption_bytes: int = 16 * 1024
    max_member_bytes: int = 64 * 1024 * 1024
    require_caption: bool = True
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif", "ppm", "pgm", "pbm")


# image members memsieve recognises but cannot decode: a specific error rather than "missing"
UNSUPPORTED_IMAGE_EXTENSIONS = ("svg", "heic", "heif", "avif", "jxl", "ico", "psd", "raw", "cr2", "nef")


def printable(text: str) -> str:
    """A str that encodes as UTF-8: bytes that were not UTF-8 (a tar member or file name) come
    back as ``\\xNN`` escapes, so they can be written to Parquet and still name their origin."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shard_name(path: str) -> str:
    base = posixpath.basename(printable(path).replace("\\", "/"))
    return base[:-4] if base.endswith(".tar") else base


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/00001.jpg`` -> (``dir/00001``, ``jpg``) as webdataset does; None when unusable."""
    base = posixpath.basename(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    prefix = posixpath.dirname(name)
    return (posixpath.join(prefix, stem) if prefix else stem), ext.lower()


def is_unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def _decode_text(raw: bytes, what: str, limit: int) -> tuple[str | None, str, str]:
    """-> (text, error_type, message); text None on error."""
    if len(raw) > limit:
        return None, f"{what}_too_long", f"{what} is {len(raw)} bytes, the limit is {limit}"
    try:
        return raw.decode("utf-8"), "", ""
    except UnicodeDecodeError as exc:
        return None, f"bad_{what}_encoding", f"{what} is not UTF-8: {exc}"


def build_sample(key: str, shard: str, members: dict[str, bytes], limits: ReadLimits) -> Sample | Failure:
    """Turn the members of one key into a Sample, or a Failure naming what is wrong."""
    meta: dict = {}
    if "json" in members:
        try:
            loaded = json.loads(members["json"].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, dict):
                raise ValueError("the json member is not an object")
            # "\\ud800" escapes decode to lone surrogates, which no UTF-8 writer accepts
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except (UnicodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting bombs
            return Failure(key, shard, "read", "invalid_json", f"json member: {type(exc).__name__}: {exc}"[:500])
    url = str(meta.get("url") or "")
    image_ext = next((e for e in limits.image_extensions if e in members), None)
    if image_ext is None:
        unsupported = [e for e in UNSUPPORTED_IMAGE_EXTENSIONS if e in members]
        if unsupported:
            msg = f"the image member is .{unsupported[0]}, which is not a supported raster format"
            return Failure(key, shard, "read", "unsupported_image_format", msg, url)
        others = ",".join(sorted(members)) or "nothing"
        return Failure(key, shard, "read", "missing_image", f"no image member (has: {others})", url)
    image = members[image_ext]
    if not image:
        return Failure(key, shard, "read", "empty_image", f"the {image_ext} member is 0 bytes", url)
    if len(image) > limits.max_image_bytes:
        msg = f"image is {len(image)} bytes, the limit is {limits.max_image_bytes}"
        return Failure(key, shard, "read", "image_too_large", msg, url)
    sha = hashlib.sha256(image).hexdigest()
    if "txt" in members:
        caption, err, msg = _decode_text(members["txt"], "caption", limits.max_caption_bytes)
        if caption is None:
            return Failure(key, shard, "read", err, msg, url, sha256=sha)
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    else:
        caption = ""
    if limits.require_caption and not caption.strip():
        return Failure(
            key, shard, "read", "missing_caption", "no caption (txt member empty or absent)", url, sha256=sha
        )
    meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
    return Sample(key, shard, url, caption.strip(), meta_json, image, image_ext, sha)


def read_sidecar(parquet_path: str) -> list[dict]:
    """Rows of an img2dataset ``.parquet`` sidecar (key, status, url, caption, error_message)."""
    import pyarrow.parquet as pq

    from transforms import fsio

    with fsio.open_input(parquet_path) as f:
        table = pq.read_table(f)
    wanted = [c for c in ("key", "status", "url", "caption", "error_message") if c in table.column_names]
    return table.select(wanted).to_pylist()


def _iter_members(fileobj, limits: ReadLimits) -> Iterator[tuple[str, bytes | None, str]]:
    """Yield (name, data, error) per regular member; data None with an error for bad members."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if info.issym() or info.islnk():  # never followed: a link could point outside the shard
                kind = "symlink" if info.issym() else "hard link"
                yield info.name, None, f"link_member: a {kind} to {printable(info.linkname)[:200]}"
                continue
            if not info.isfile():  # directories, devices, fifos: not part of any sample
                yield info.name, None, "not_a_file"
                continue
            if info.size > limits.max_member_bytes:
                yield info.name, None, f"member_too_large:{info.size}"
                continue
            handle = tar.extractfile(info)
            yield info.name, (handle.read() if handle else b""), ""


@dataclass
class _ShardState:
    shard: str
    limits: ReadLimits
    seen: set
    n_members: int = 0
    truncated: str = ""

    def flush(self, key: str | None, members: dict[str, bytes], bad: list[str]) -> Iterator[Sample | Failure]:
        if key is None:
            return
        if key in self.seen:
            yield Failure(key, self.shard, "read", "duplicate_key", "the key repeats within the shard")
            return
        self.seen.add(key)
        if bad:
            yield Failure(key, self.shard, "read", bad[0].split(":")[0], bad[0])
            return
        result = build_sample(key, self.shard, members, self.limits)
        if isinstance(result, Failure) and self.truncated and result.error_type.startswith("missing_"):
            msg = f"{result.message}; {self.truncated}"
            result = Failure(key, self.shard, "read", "truncated_tar", msg, result.url)
        yield result


def _guarded_members(raw, state: _ShardState, events: list[str]) -> Iterator[tuple[str, bytes | None, str]]:
    """The tar's members; a read error ends the stream and marks the shard truncated.

    Only reading the tar is guarded: errors raised by whoever consumes the samples are not
    mistaken for a broken shard.
    """
    it = _iter_members(raw, state.limits)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:  # tarfile.ReadError, EOFError, zlib/OS errors: keep what came before
            state.truncated = f"shard unreadable after {state.n_members} members: {type(exc).__name__}: {exc}"
            events.append(f"truncated_tar:{state.truncated}")
            log.warning("shard %s: %s", state.shard, state.truncated)
            return
        state.n_members += 1
        yield item


def iter_shard(path: str, limits: ReadLimits) -> Iterator[Sample | Failure | dict]:
    """Every Sample and Failure of one shard, then its summary dict (always last)."""
    from transforms import fsio

    state = _ShardState(shard_name(path), limits, set())
    events: list[str] = []
    sidecar = _read_sidecar_rows(path, events)
    key, members, bad = None, {}, []
    try:
        raw = fsio.open_input(path)
    except Exception as exc:  # unreadable file: the sidecar rows still reach the manifest
        state.truncated = f"shard cannot be opened: {type(exc).__name__}: {exc}"
        events.append(f"unreadable_shard:{state.truncated}")
        raw = None
    if raw is not None:
        with raw:
            for name, data, err in _guarded_members(raw, state, events):
                if err == "not_a_file":
                    events.append(f"skipped_non_file_member:{printable(name)[:200]}")
                    continue
                unsafe = is_unsafe_name(name)
                if printable(name) != name:  # not UTF-8: the key is kept, escaped, as a failure
                    err = err or f"bad_member_name_encoding: {printable(name)[:200]} is not UTF-8"
                    name = printable(name)
                split = split_member_name(name)
                if split is None:
                    events.append(f"unrecognized_member:{name[:200]}")
                    continue
                if split[0] != key:
                    yield from state.flush(key, members, bad)
                    key, members, bad = split[0], {}, []
                if unsafe:
                    bad.append(f"unsafe_member_name: {name[:200]}")
                elif err:
                    bad.append(err)
                else:
                    members[split[1]] = data
    yield from state.flush(key, members, bad)
    if raw is not None and not state.n_members and not state.truncated:
        events.append("empty_shard: the tar has no members")
    yield from _sidecar_failures(state, sidecar)
    log.info(
        "read shard %s: %d keys from %d members%s",
        state.shard,
        len(state.seen),
        state.n_members,
        " (truncated)" if state.truncated else "",
    )
    yield {
        "shard": state.shard,
        "path": printable(path),
        "members": state.n_members,
        "keys": len(state.seen),
        "sidecar_rows": len(sidecar),
        "truncated": bool(state.truncated),
        "events": events,
    }


def _read_sidecar_rows(path: str, events: list[str]) -> list[dict]:
    from transforms import fsio

    side = path[:-4] + ".parquet" if path.endswith(".tar") else path + ".parquet"
    try:
        if not fsio.exists(side):
            return []
        return read_sidecar(side)
    except Exception as exc:  # a corrupt sidecar must not lose the tar's samples
        events.append(f"bad_sidecar:{type(exc).__name__}: {exc}")
        return []


def _sidecar_failures(state: _ShardState, rows: list[dict]) -> Iterator[Failure]:
    for row in rows:
        key = str(row.get("key") or "")
        if not key or key in state.seen:
            continue
        state.seen.add(key)
        status = str(row.get("status") or "unknown")
        url, caption = str(row.get("url") or ""), str(row.get("caption") or "")
        if status != "success":
            yield Failure(key, state.shard, "download", status, str(row.get("error_message") or status), url, caption)
        elif state.truncated:
            yield Failure(key, state.shard, "read", "truncated_tar", state.truncated, url, caption)
        else:
            msg = "listed as success in the parquet sidecar but absent from the tar"
            yield Failure(key, state.shard, "read", "missing_from_shard", msg, url, caption)


class ReadShardFn(beam.DoFn):
    """One shard path in; samples out, failures and one shard summary as tagged outputs."""

    def __init__(self, limits: ReadLimits):
        self.limits = limits

    def process(self, path: str) -> Iterable:
        for item in iter_shard(path, self.limits):
            if isinstance(item, Failure):
                yield beam.pvalue.TaggedOutput(FAILURES, item)
            elif isinstance(item, dict):
                beam.metrics.Metrics.counter("read", "shards").inc()
                progress.advance("shards")
                yield beam.pvalue.TaggedOutput(SHARD_EVENTS, item)
            else:
                yield item


def duplicate_key_failures(item: tuple[str, Iterable[str]]) -> Iterator[Failure]:
    """(key, shards) -> a ``duplicate_key`` failure for every occurrence after the first shard."""
    key, shards = item
    ordered = sorted(set(shards))  # a key repeated inside one shard is reported by the reader
    for shard in ordered[1:]:
        yield Failure(key, shard, "read", "duplicate_key", f"the key also appears in shard {ordered[0]}")


class ReadShards(beam.PTransform):
    """Shard paths -> {"samples": Sample, "failures": Failure, "shards": summary dict}.

    Keys that repeat across shards keep their first occurrence (by shard name); the others are
    reported in the dead letter as ``duplicate_key`` (only (key, shard) pairs are shuffled for
    that, off the main path) and the join by key downstream keeps the first shard's record.
    """

    def __init__(self, limits: ReadLimits):
        super().__init__()
        self.limits = limits

    def expand(self, paths):
        read = (
            paths
            | "Reshuffle" >> beam.Reshuffle()
            | "ReadShard" >> beam.ParDo(ReadShardFn(self.limits)).with_outputs(FAILURES, SHARD_EVENTS, main=SAMPLES)
        )
        repeated = (
            read[SAMPLES]
            | "KeyShard" >> beam.Map(lambda s: (s.key, s.shard))
            | "GroupKeys" >> beam.GroupByKey()
            | "RepeatedKeys" >> beam.FlatMap(duplicate_key_failures)
        )
        failures = (read[FAILURES], repeated) | "MergeReadFailures" >> beam.Flatten()
        return {"samples": read[SAMPLES], "failures": failures, "shards": read[SHARD_EVENTS]}
