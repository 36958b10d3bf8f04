"""Row batches kept out of Beam's data plane: written once to a file, passed on as a small reference.

The cell search's payload (float16 vectors: 1 GB a million 512-d rows, more with rows in two
cells) crossed every stage boundary through the runner: on Beam's in-process runner each crossing
is an encode, a data-channel buffer, a decode and a grouping buffer (about 3 copies), and the
buffer in front of a side-input consumer holds the whole collection. With a spill folder, a batch
(``transforms.row_blobs``'s packed bytes) is written to ``<folder>/<uuid>.rb`` and only a
``SpillRef`` (path, rows, bytes: ~150 bytes) travels; the stage that needs the rows reads the
file back (``row_blobs.rows_of`` accepts a reference wherever it accepts packed bytes).

Paths go through ``transforms.fsio`` (local disk, s3://, gs://). Every write gets a fresh name, so
a retried bundle never overwrites a file that a committed bundle's reference points at; the files
of a failed attempt are never referenced and go with the folder. The folder lives in the run's
staging folder (``pipeline.graph.spill_folder``) and is removed when the Beam pipeline ends
(``pipeline.job``), whatever happens; a killed run's is removed with its staging folder by the
next run on the output.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import numpy as np

from transforms import fsio, row_blobs

FOLDER = "_spill"


@dataclasses.dataclass(frozen=True)
class SpillRef:
    """Where a packed row batch lies: a file of ``row_blobs.pack`` bytes."""

    path: str
    rows: int
    nbytes: int


@dataclasses.dataclass(frozen=True, eq=False)
class InputRows:
    """Rows that are already what the cell search stores, in an input ``.npy`` file (LAION's unit
    float16 embeddings): read again from there where they are needed (``read_input``), so they
    are never spilled (1M x 512: a 1 GB write saved). ``keys``: the kept rows' keys (a numpy
    string array); ``take``: the kept rows, counted from ``start`` (None: every row).
    ``payload``: the (rows, 1, d) rows as the reader had them, for the steps fused with it (the
    k-means sample); never encoded: past a stage boundary the rows are read again."""

    path: str
    start: int
    stop: int
    keys: np.ndarray
    take: np.ndarray | None = None
    payload: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "payload": None}


def read_input(ref: InputRows) -> tuple:
    """-> (keys, (rows, 1, d) payload) of an ``InputRows`` reference."""
    if ref.payload is not None:
        return ref.keys, ref.payload
    from transforms.laion_files import NpyRows

    source = NpyRows(ref.path)
    try:
        v = source.rows(ref.start, ref.stop)
    finally:
        source.close()
    v = v.reshape(len(v), 1, -1)
    return ref.keys, v if ref.take is None else v[ref.take]


def folder_of(out_dir: str, name: str = "") -> str:
    """The spill folder of a run's staging folder (``""``: none, batches stay in Beam's data plane)."""
    if not out_dir:
        return ""
    return fsio.join(out_dir, FOLDER, name) if name else fsio.join(out_dir, FOLDER)


def write(folder: str, keys: np.ndarray, payload: np.ndarray, cells: np.ndarray | None = None, groups: int = 0):
    """(keys, payload[, cells, groups]) -> a SpillRef to a new file under ``folder`` holding them."""
    parts = row_blobs.pieces(keys, payload, cells, groups)
    path = fsio.join(folder, f"{uuid.uuid4().hex}.rb")
    nbytes = sum(memoryview(p).nbytes for p in parts)
    if fsio.is_remote(path):
        fsio.write_bytes(path, b"".join(parts))  # one PUT
    else:
        local = fsio._local(path)
        try:
            f = open(local, "wb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            f = open(local, "wb")  # noqa: SIM115
        with f:
            f.writelines(parts)
    return SpillRef(path, len(keys), nbytes)


def read(ref: SpillRef) -> bytes:
    """The packed bytes of a reference (one read: no zero-filled buffer first)."""
    with fsio.open_input(ref.path) as f:
        data = f.read()
    if len(data) != ref.nbytes:
        raise EOFError(f"{ref.path}: {len(data)} bytes, {ref.nbytes} written")
    return data
