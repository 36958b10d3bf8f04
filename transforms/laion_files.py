"""Files of LAION's precomputed-embedding layout: listing, headers and row ranges (no Beam).

``ROOT/img_emb/img_emb_N.npy`` (one embedding per row) pairs with
``ROOT/metadata/metadata_N.parquet`` (key, url, caption, sizes, ... one row per embedding) by N.
The listing reads only headers (the .npy header, the Parquet footer), so planning costs a few
small reads per file, never the data. Vector rows are read with a seek and a read into a fresh
array (``NpyRows``), from local files and Beam's filesystems (gs://, s3://) alike: each row is
read once, and no memory map keeps a whole file's pages resident.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re

import numpy as np

RANGE_ROWS = 65_536  # rows per work item (row groups are merged up to this)
_NUMBER = re.compile(r"(\d+)\.(?:npy|parquet)$")


@dataclasses.dataclass(frozen=True)
class LaionFile:
    """One pair of files and what their headers say."""

    shard: str  # the metadata file's identity (its name without .parquet)
    npy: str | None
    metadata: str | None
    n_vectors: int = 0
    n_metadata: int = 0
    dim: int = 0
    row_groups: tuple[int, ...] = ()  # rows per metadata row group
    problems: tuple[str, ...] = ()  # file-level findings (missing/unreadable files, count mismatch)

    @property
    def rows(self) -> int:
        return max(self.n_vectors, self.n_metadata)

    @property
    def npy_ok(self) -> bool:
        return bool(self.npy) and not any(p.startswith("bad_embedding") for p in self.problems)

    @property
    def metadata_ok(self) -> bool:
        return bool(self.metadata) and not any(p.startswith("bad_metadata") for p in self.problems)


@dataclasses.dataclass(frozen=True)
class RowRange:
    """A work item: rows [start, stop) of one file pair; ``row_groups`` cover them in the metadata."""

    file: LaionFile
    start: int
    stop: int
    row_groups: tuple[int, ...] = ()


def open_file(path: str):
    if "://" in path:
        from apache_beam.io.filesystems import CompressionTypes, FileSystems

        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return open(path, "rb")


def _join(root: str, *parts: str) -> str:
    if "://" in root:
        return posixpath.join(root.rstrip("/"), *parts)
    import os

    return os.path.join(root, *parts)


def _match(pattern: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    try:
        return [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:  # nothing matches (some filesystems raise)
        return []


def _number(path: str) -> int | None:
    m = _NUMBER.search(path)
    return int(m.group(1)) if m else None


def npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """-> (shape, dtype, fortran_order, data offset) of an open .npy file."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = fmt._read_array_header(f, version)
    return shape, dtype, fortran, f.tell()


def _inspect_npy(path: str) -> tuple[int, int, list[str]]:
    """-> (whole rows present, dim, problems)."""
    try:
        with open_file(path) as f:
            shape, dtype, fortran, offset = npy_header(f)
            f.seek(0, 2)
            size = f.tell()
    except Exception as exc:  # unreadable or not a .npy file
        return 0, 0, [f"bad_embedding_file: {posixpath.basename(path)}: {type(exc).__name__}: {exc}"[:300]]
    if len(shape) != 2 or dtype.kind != "f" or fortran:
        return 0, 0, [f"bad_embedding_file: {posixpath.basename(path)} holds {dtype} {shape}, not float rows"]
    rows, dim = shape
    whole = (size - offset) // max(1, dim * dtype.itemsize)
    if whole < rows:
        return int(whole), dim, [f"truncated_embedding_file: header says {rows} rows, {whole} present"]
    return int(rows), int(dim), []


def _inspect_parquet(path: str) -> tuple[int, tuple[int, ...], list[str]]:
    import pyarrow.parquet as pq

    try:
        with open_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    except Exception as exc:
        return 0, (), [f"bad_metadata_file: {posixpath.basename(path)}: {type(exc).__name__}: {exc}"[:300]]
    return int(sum(groups)), groups, []


def list_files(root: str) -> list[LaionFile]:
    """Every img_emb/metadata pair under ``root`` ordered by N, with header facts."""
    npys = {n: p for p in _match(_join(root, "img_emb", "*.npy")) if (n := _number(p)) is not None}
    metas = {n: p for p in _match(_join(root, "metadata", "*.parquet")) if (n := _number(p)) is not None}
    out = []
    for n in sorted(set(npys) | set(metas)):
        npy, meta = npys.get(n), metas.get(n)
        shard = posixpath.basename(meta)[: -len(".parquet")] if meta else f"metadata_{n}"
        problems: list[str] = []
        n_vec, dim, n_meta, groups = 0, 0, 0, ()
        if npy:
            n_vec, dim, found = _inspect_npy(npy)
            problems += found
        else:
            problems.append(f"missing_embedding_file: no img_emb_{n}.npy")
        if meta:
            n_meta, groups, found = _inspect_parquet(meta)
            problems += found
        else:
            problems.append(f"missing_metadata_file: no metadata_{n}.parquet")
        if npy and meta and n_vec != n_meta and not problems:
            problems.append(f"row_count_mismatch: {n_vec} vectors, {n_meta} metadata rows")
        out.append(LaionFile(shard, npy, meta, n_vec, n_meta, dim, groups, tuple(problems)))
    return out


def plan_ranges(files: list[LaionFile], range_rows: int = RANGE_ROWS) -> list[RowRange]:
    """Work items: metadata row groups merged up to ``range_rows`` rows (a bigger group is one
    item), then rows beyond the metadata (vectors without a row) in ``range_rows`` steps."""
    out = []
    for lf in files:
        start, pos, groups = 0, 0, []
        for i, n in enumerate(lf.row_groups):
            if groups and pos - start + n > range_rows:
                out.append(RowRange(lf, start, pos, tuple(groups)))
                start, groups = pos, []
            groups.append(i)
            pos += n
        if groups:
            out.append(RowRange(lf, start, pos, tuple(groups)))
        for s in range(lf.n_metadata, lf.rows, range_rows):
            out.append(RowRange(lf, s, min(lf.rows, s + range_rows)))
    return out


class NpyRows:
    """One open .npy file whose rows are read by seek and read: a local file or any path of
    Beam's filesystems (gs://, s3://). No memory map: mapped pages stay resident, so the
    reader's RSS would grow with every file it has read."""

    def __init__(self, path: str):
        self.path = path
        self.f = open_file(path)
        shape, self.dtype, _, self.offset = npy_header(self.f)
        self.dim = int(shape[1])
        self.width = self.dim * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), self.dim), dtype=self.dtype)
        if not len(out):
            return out
        self.f.seek(self.offset + start * self.width)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(buf):
            if hasattr(self.f, "readinto"):
                got = self.f.readinto(buf[done:])
            else:
                chunk = self.f.read(len(buf) - done)
                got = len(chunk)
                buf[done : done + got] = chunk
            if not got:
                raise EOFError(f"{self.path}: rows {start}-{stop} are past the end of the file")
            done += got
        return out

    def close(self) -> None:
        self.f.close()


class VectorSource:
    """Rows of .npy files, one open file at a time (a reader works through one file's ranges)."""

    def __init__(self):
        self._open: NpyRows | None = None

    def rows(self, path: str, start: int, stop: int) -> np.ndarray:
        if self._open is None or self._open.path != path:
            self.close()
            self._open = NpyRows(path)
        return self._open.rows(start, stop)

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
