"""One filesystem layer for every path memsieve reads or writes: local disk, s3:// and gs://.

Local paths use the standard library (``os.replace`` is an atomic rename); URLs go through
fsspec (``s3fs`` for s3://, ``gcsfs`` for gs://, installed by the ``aws`` / ``gcp`` extras). An
object store has no rename: a "rename" there is copy + delete, and a single object written by one
PUT appears whole or not at all. So:

- ``write_bytes`` / ``atomic_writer``: local files go to ``NAME.tmp-<pid>`` then ``os.replace``;
  remote objects are buffered and written by one PUT (never visible half-written).
- ``rename``: atomic on local disk (files and folders); on object stores each object is copied
  then deleted, so a folder rename is not atomic: the commit protocol (``pipeline.job``) only
  relies on the last object it writes (``run.json``) appearing whole.

Endpoints and credentials are fsspec's and boto's usual ones (``AWS_ENDPOINT_URL``,
``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``...).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import os
import posixpath
import re
import shutil
import stat as stat_mod

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
GLOB_CHARS = ("*", "?", "[")


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _fs(path: str):
    """-> (fsspec filesystem, path inside it) for a URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(path)


def _url(fs, inner: str) -> str:
    """A path inside ``fs`` -> the full URL (fsspec's glob and ls drop the scheme)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return f"{protocol}://{inner}"


def join(base: str, *parts: str) -> str:
    if not is_remote(base):
        return os.path.join(_local(base), *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(_local(path))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(_local(path))


def absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(_local(path))


# ----------------------------------------------------------------------------- queries


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, inner = _fs(path)
    return fs.exists(inner)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(_local(path))
    fs, inner = _fs(path)
    return fs.isdir(inner)


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(_local(path))
    fs, inner = _fs(path)
    return fs.isfile(inner)


def listdir(path: str) -> list[str]:
    """Names (not paths) directly inside a folder, sorted; [] when it is absent."""
    if not is_remote(path):
        return sorted(os.listdir(_local(path))) if os.path.isdir(_local(path)) else []
    fs, inner = _fs(path)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False, refresh=True))
    except FileNotFoundError:
        return []


def walk_files(path: str) -> list[str]:
    """Every file under a folder, as paths relative to it, sorted."""
    if not is_remote(path):
        root = _local(path)
        out = []
        for folder, _, files in os.walk(root):
            out += [os.path.relpath(os.path.join(folder, f), root) for f in files]
        return sorted(out)
    fs, inner = _fs(path)
    try:
        found = fs.find(inner.rstrip("/") + "/")
    except FileNotFoundError:
        return []
    return sorted(posixpath.relpath(p, inner.rstrip("/")) for p in found)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(_local(path))
    fs, inner = _fs(path)
    return int(fs.info(inner)["size"])


# ----------------------------------------------------------------------------- listing


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> a00b a01b a02b (zero-padded as written); ``{x,y}`` -> both; nested ok."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # a literal {x}: not an expansion (bash leaves it as is)
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + c + t for c in choices for t in expand_braces(tail)]


def _local_entries(folder: str, cache: dict) -> dict[str, os.stat_result]:
    if folder not in cache:
        entries = {}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            with os.scandir(folder or ".") as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        entries[e.name] = e.stat()
        cache[folder] = entries
    return cache[folder]


def _remote_entries(fs, folder: str, cache: dict) -> dict[str, dict]:
    if folder not in cache:
        try:
            cache[folder] = {posixpath.basename(d["name"].rstrip("/")): d for d in fs.ls(folder, detail=True)}
        except FileNotFoundError:
            cache[folder] = {}
    return cache[folder]


def match(pattern: str) -> list[tuple[str, str]]:
    """Every entry matching a glob (braces expanded) -> sorted [(path, kind)], kind "file", "dir" or
    "other" (a FIFO, device, socket). One listing per parent folder, so a 10,000-name brace
    range costs a few listings, not 10,000 requests."""
    found: dict[str, str] = {}
    remote = is_remote(pattern)
    fs = _fs(pattern)[0] if remote else None
    listings: dict = {}
    for pat in expand_braces(pattern):
        inner = _fs(pat)[1] if remote else _local(pat)
        parent, leaf = posixpath.split(inner) if remote else os.path.split(inner)
        if any(c in parent for c in GLOB_CHARS):  # a wildcard folder: let the library walk it
            paths = fs.glob(inner) if remote else _glob_local(inner)
            for p in paths:
                found[_url(fs, p) if remote else p] = _kind_of(p, fs)
            continue
        entries = _remote_entries(fs, parent, listings) if remote else _local_entries(parent, listings)
        for name in fnmatch.filter(entries, leaf) if any(c in leaf for c in GLOB_CHARS) else [leaf]:
            if name in entries:
                full = posixpath.join(parent, name) if remote else os.path.join(parent, name)
                found[_url(fs, full) if remote else full] = _entry_kind(entries[name])
    return sorted(found.items())


def _glob_local(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern)


def _entry_kind(entry) -> str:
    if isinstance(entry, dict):
        return "dir" if entry.get("type") == "directory" else "file"
    if stat_mod.S_ISDIR(entry.st_mode):
        return "dir"
    return "file" if stat_mod.S_ISREG(entry.st_mode) else "other"


def _kind_of(path: str, fs) -> str:
    if fs is not None:
        return "dir" if fs.isdir(path) else "file"
    try:
        return _entry_kind(os.stat(path))
    except OSError:
        return "other"


# ----------------------------------------------------------------------------- reading


def open_input(path: str, mode: str = "rb"):
    """A readable binary stream (a shard, a sidecar, a table part)."""
    if not is_remote(path):
        return open(_local(path), mode)  # noqa: SIM115 - the caller closes it
    fs, inner = _fs(path)
    return fs.open(inner, mode, block_size=8 * 1024 * 1024)


def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def fingerprint(path: str) -> str:
    """A content fingerprint: sha256 of a local file's bytes; on object stores the checksum the
    store computed from the content (S3 ETag, GCS md5/crc32c) with the size, never the mtime.
    "absent" when there is no such file."""
    if not is_remote(path):
        local = _local(path)
        if not os.path.isfile(local):
            return "absent"
        with open(local, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    fs, inner = _fs(path)
    try:
        info = fs.info(inner)
    except FileNotFoundError:
        return "absent"
    for field in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(field):
            return f"{field}:{str(info[field]).strip(chr(34))}:{info.get('size')}"
    with fs.open(inner, "rb") as f:  # a store without checksums: hash the bytes
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------- writing


def makedirs(path: str) -> None:
    """Local folders are created; object stores have no folders (nothing to do)."""
    if not is_remote(path):
        os.makedirs(_local(path), exist_ok=True)


@contextlib.contextmanager
def atomic_writer(path: str):
    """A binary file handle whose content appears at ``path`` only when the block succeeds."""
    if not is_remote(path):
        local = _local(path)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    buf = io.BytesIO()
    yield buf
    fs, inner = _fs(path)
    fs.pipe_file(inner, buf.getvalue())  # one PUT: the object appears whole or not at all


def write_bytes(path: str, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    """Delete a file or a folder tree; absent is fine."""
    if not is_remote(path):
        local = _local(path)
        if os.path.isdir(local) and not os.path.islink(local):
            shutil.rmtree(local, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)
        return
    fs, inner = _fs(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(inner, recursive=True)
    fs.invalidate_cache()


def rename(src: str, dst: str) -> None:
    """Move a file or folder to ``dst`` (replacing it). Atomic on local disk; copy + delete per
    object on object stores."""
    if not is_remote(src):
        os.makedirs(os.path.dirname(_local(dst)) or ".", exist_ok=True)
        os.replace(_local(src), _local(dst))
        return
    fs, inner = _fs(src)
    target = _fs(dst)[1]
    if fs.isdir(inner):
        for rel in walk_files(src):
            fs.mv(posixpath.join(inner, rel), posixpath.join(target, rel))
    else:
        fs.mv(inner, target)
    fs.invalidate_cache()


def put_tree(local_dir: str, dst: str) -> None:
    """Copy a local folder's files to ``dst`` (a local folder or a URL prefix)."""
    for rel in walk_files(local_dir):
        with open(os.path.join(local_dir, rel), "rb") as f:
            write_bytes(join(dst, *rel.split(os.sep)), f.read())
