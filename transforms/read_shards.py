"""Stream img2dataset / webdataset shards into samples, with a dead letter for bad ones.

A shard is read member by member (``tarfile`` in stream mode over Beam's filesystems, so
local paths, gs:// and s3:// all work when their extras are installed; gzip-compressed tars are
read whatever their name). Members are grouped by webdataset key; a group becomes a ``Sample``
or a ``Failure`` with a specific error type. A key that repeats right after itself starts a new
group (reported as ``duplicate_key``), so the second picture never takes the first caption.
The img2dataset ``.parquet`` sidecar is read too (``transforms.sidecar``), so that rows it
recorded as failed (never in the tar) and rows lost to a truncated tar still reach the manifest.

A shard's identity (``shard_name``) is its name plus a hash of its full path: two folders both
holding ``00000.tar``, or ``web 1.tar`` beside ``web_1.tar``, never share part files or caches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import apache_beam as beam

from pipeline import progress
from schemas.elements import Failure, Sample
from transforms.sidecar import original_sizes, read_sidecar, read_sidecar_rows, sidecar_failures, tar_stem
from transforms.tar_members import iter_members

log = logging.getLogger(__name__)

SAMPLES = "samples"
FAILURES = "failures"
SHARD_EVENTS = "shard_events"
__all__ = ["ReadLimits", "ReadShards", "build_sample", "iter_shard", "read_sidecar", "shard_name"]


@dataclass(frozen=True)
class ReadLimits:
    max_image_bytes: int = 32 * 1024 * 1024
    max_caption_bytes: int = 16 * 1024
    max_member_bytes: int = 64 * 1024 * 1024
    require_caption: bool = True
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif", "ppm", "pgm", "pbm")
    max_members_per_key: int = 64
    max_json_bytes: int = 1024 * 1024


# image members memsieve may not decode: decoded by content, else a specific error, not "missing"
UNSUPPORTED_IMAGE_EXTENSIONS = ("svg", "heic", "heif", "avif", "jxl", "ico", "psd", "raw", "cr2", "nef")
_TEXT_EXTENSIONS = ("txt", "json")


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


def _full_path(path: str) -> str:
    if "://" in path:
        return path
    return os.path.abspath(path[7:] if path.startswith("file:") else path)


def shard_name(path: str) -> str:
    """The shard's identity: its file name (without .tar) plus 12 hex of a hash of its full path."""
    full = printable(_full_path(path))
    base = posixpath.basename(full.replace("\\", "/"))
    stem = tar_stem(base)
    return f"{stem}-{hashlib.sha256(full.encode('utf-8')).hexdigest()[:12]}"


def normalise_member_name(name: str) -> str:
    """``./00001.jpg`` (``tar -C dir .``) -> ``00001.jpg``: one key, not two."""
    while name.startswith("./"):
        name = name[2:]
    return name


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/00001.jpg`` -> (``dir/00001``, ``jpg``) as webdataset does; None when unusable."""
    name = normalise_member_name(name)
    base = posixpath.basename(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    prefix = posixpath.dirname(name)
    return (posixpath.join(prefix, stem) if prefix else stem), ext.lower()


def is_unsafe_name(name: str) -> bool:
    name = normalise_member_name(name)
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def _decode_text(raw: bytes, what: str, limit: int) -> tuple[str | None, str, str]:
    """-> (text, error_type, message); text None on error."""
    if len(raw) > limit:
        return None, f"{what}_too_long", f"{what} is {len(raw)} bytes, the limit is {limit}"
    try:
        return raw.decode("utf-8"), "", ""
    except UnicodeDecodeError as exc:
        return None, f"bad_{what}_encoding", f"{what} is not UTF-8: {exc}"


def _load_meta(raw: bytes | None, limits: ReadLimits) -> tuple[dict, str]:
    """The json member -> (object, error message); "" when fine or absent."""
    if raw is None:
        return {}, ""
    if len(raw) > limits.max_json_bytes:
        return {}, f"json member is {len(raw)} bytes, the limit is {limits.max_json_bytes}"
    try:
        loaded = json.loads(raw.decode("utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError("the json member is not an object")
        # "\\ud800" escapes decode to lone surrogates, which no UTF-8 writer accepts
        json.dumps(loaded, ensure_ascii=False).encode("utf-8")
        return loaded, ""
    except (UnicodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting bombs
        return {}, f"json member: {type(exc).__name__}: {exc}"[:500]


def build_sample(key: str, shard: str, members: dict[str, bytes], limits: ReadLimits) -> Sample | Failure:
    """Turn the members of one key into a Sample, or a Failure naming what is wrong."""
    meta, bad_json = _load_meta(members.get("json"), limits)
    if bad_json:
        return Failure(key, shard, "read", "invalid_json", bad_json)
    url = meta.get("url")
    url = url if isinstance(url, str) else ""
    image_ext = next((e for e in limits.image_extensions if e in members), None)
    # formats named by the member that may not decode: the decoder decides by content (an .avif
    # or .ico is kept when it decodes; an .svg or .heic fails as unsupported_image_format)
    image_ext = image_ext or next((e for e in UNSUPPORTED_IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        others = ",".join(sorted(members)) or "nothing"
        return Failure(key, shard, "read", "missing_image", f"no image member (has: {others})"[:500], url)
    image = members[image_ext]
    if not image:
        return Failure(key, shard, "read", "empty_image", f"the {image_ext} member is 0 bytes", url)
    if len(image) > limits.max_image_bytes:
        msg = f"image is {len(image)} bytes, the limit is {limits.max_image_bytes}"
        return Failure(key, shard, "read", "image_too_large", msg, url)
    sha = hashlib.sha256(image).hexdigest()
    if "txt" in members:
        raw_caption = members["txt"]
    elif isinstance(meta.get("caption"), str):  # the json's caption obeys the same limits
        raw_caption = meta["caption"].encode("utf-8")
    else:
        raw_caption = b""
    caption, err, msg = _decode_text(raw_caption, "caption", limits.max_caption_bytes)
    if caption is None:
        return Failure(key, shard, "read", err, msg, url, sha256=sha)
    if limits.require_caption and not caption.strip():
        return Failure(
            key, shard, "read", "missing_caption", "no caption (txt member empty or absent)", url, sha256=sha
        )
    meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
    return Sample(key, shard, url, caption.strip(), meta_json, image, image_ext, sha)


@dataclass
class _Group:
    key: str | None = None
    members: dict = field(default_factory=dict)
    bad: list = field(default_factory=list)
    exts: set = field(default_factory=set)
    count: int = 0


@dataclass
class _ShardState:
    shard: str
    limits: ReadLimits
    seen: set
    n_members: int = 0
    truncated: str = ""

    def flush(self, group: _Group) -> Iterator[Sample | Failure]:
        key = group.key
        if key is None:
            return
        if key in self.seen:
            yield Failure(key, self.shard, "read", "duplicate_key", "the key repeats within the shard")
            return
        self.seen.add(key)
        if group.bad:
            yield Failure(key, self.shard, "read", group.bad[0].split(":")[0], group.bad[0][:500])
            return
        result = build_sample(key, self.shard, group.members, self.limits)
        if isinstance(result, Failure) and self.truncated and result.error_type.startswith("missing_"):
            msg = f"{result.message}; {self.truncated}"
            result = Failure(key, self.shard, "read", "truncated_tar", msg[:500], result.url)
        yield result

    def add(self, group: _Group, ext: str, data: bytes | None, err: str) -> None:
        group.count += 1
        group.exts.add(ext)
        if group.count > self.limits.max_members_per_key:
            if not any(b.startswith("too_many_members") for b in group.bad):
                limit = self.limits.max_members_per_key
                group.bad.append(f"too_many_members: more than {limit} members under one key")
            group.members.clear()
        elif err:
            group.bad.append(err)
        else:
            group.members[ext] = data


def _guarded_members(raw, state: _ShardState, events: list[str]) -> Iterator[tuple[str, bytes | None, str]]:
    """The tar's members; a read error ends the stream and marks the shard truncated.

    Only reading the tar is guarded: errors raised by whoever consumes the samples are not
    mistaken for a broken shard.
    """
    it = iter_members(raw, state.limits)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:  # tarfile.ReadError, EOFError, zlib/OS errors: keep what came before
            state.truncated = f"shard unreadable after {state.n_members} members: {type(exc).__name__}: {exc}"[:500]
            events.append(f"truncated_tar:{state.truncated}")
            log.warning("shard %s: %s", state.shard, state.truncated)
            return
        state.n_members += 1
        yield item


def _not_a_regular_file(path: str) -> str:
    """Why a local shard path cannot be streamed (a FIFO would block, a folder is no tar); ""."""
    if "://" in path:
        return ""
    try:
        mode = os.stat(path[7:] if path.startswith("file:") else path).st_mode
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return "" if stat.S_ISREG(mode) else "not a regular file (a FIFO, device or folder)"


def _open_shard(path: str):
    from transforms import fsio  # local, s3://, gs:// (transforms/fsio.py)

    return fsio.open_input(path)


def _members_to_groups(raw, state: _ShardState, events: list[str]) -> Iterator[Sample | Failure]:
    group = _Group()
    for name, data, err in _guarded_members(raw, state, events):
        if err == "not_a_file":
            events.append(f"skipped_non_file_member:{printable(name)[:200]}")
            continue
        name = normalise_member_name(name)
        unsafe = is_unsafe_name(name)
        if printable(name) != name:  # not UTF-8: the key is kept, escaped, as a failure
            err = err or f"bad_member_name_encoding: {printable(name)[:200]} is not UTF-8"
            name = printable(name)
        split = split_member_name(name)
        if split is None:
            events.append(f"unrecognized_member:{name[:200]}")
            continue
        key, ext = split
        if key != group.key or ext in group.exts:  # a repeated key starts a new group
            yield from state.flush(group)
            group = _Group(key)
        if unsafe:
            err = f"unsafe_member_name: {name[:200]}"
        state.add(group, ext, data, err)
    yield from state.flush(group)


def iter_shard(path: str, limits: ReadLimits, sizes: dict | None = None) -> Iterator[Sample | Failure | dict]:
    """Every Sample and Failure of one shard, then its summary dict (always last).

    ``sizes`` (when given) is filled with the sidecar's original image sizes (by
    ``transforms.sidecar.key_id``) before the first sample is yielded."""
    state = _ShardState(shard_name(path), limits, set())
    events: list[str] = []
    sidecar = read_sidecar_rows(path, events)
    if sizes is not None:
        sizes.update(original_sizes(sidecar))
    raw = None
    why = _not_a_regular_file(path)
    if not why:
        try:
            raw = _open_shard(path)
        except Exception as exc:  # unreadable file: the sidecar rows still reach the manifest
            why = f"{type(exc).__name__}: {exc}"
    if why:
        state.truncated = f"shard cannot be opened: {why}"[:500]
        events.append(f"unreadable_shard:{state.truncated}")
    else:
        with raw:
            yield from _members_to_groups(raw, state, events)
        if not state.n_members and not state.truncated:
            events.append("empty_shard: the tar has no members")
    yield from sidecar_failures(state.shard, state.seen, state.truncated, sidecar)
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

    Keys that repeat across shards keep their first occurrence (by shard identity); the others
    are reported in the dead letter as ``duplicate_key`` (only (key, shard) pairs are shuffled
    for that, off the main path) and the join by key downstream keeps the first shard's record.
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
