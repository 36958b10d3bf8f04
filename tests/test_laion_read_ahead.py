"""The LAION reader's read-ahead: the next batch is read (and its norms computed) on a helper
thread; outputs equal a batch-by-batch read, errors surface in process, and a range left half
read leaves the helper free for the next one."""

import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transforms import laion_files
from transforms.laion_files import list_files, plan_ranges
from transforms.read_laion import LaionSettings, ReadRangeFn, row_norms

DIM = 8


def _layout(root, files=2, rows=2500):
    os.makedirs(root / "img_emb")
    os.makedirs(root / "metadata")
    rng = np.random.default_rng(3)
    for n in range(files):
        x = rng.standard_normal((rows, DIM)).astype(np.float32)
        np.save(
            root / "img_emb" / f"img_emb_{n}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        )
        keys = [f"k{n}-{i % (rows - 7)}" for i in range(rows)]  # a few keys repeat inside the file
        table = pa.table({"key": keys, "caption": [f"caption {i}" for i in range(rows)], "url": ["u"] * rows})
        pq.write_table(table, root / "metadata" / f"metadata_{n}.parquet", row_group_size=1000)
    return plan_ranges(list_files(str(root)), 2000)


def _plain(value):
    """Arrow arrays, tables and numpy arrays as Python values, recursively."""
    if isinstance(value, pa.Table):
        return value.to_pylist()
    if isinstance(value, pa.Array | pa.ChunkedArray):
        return value.to_pylist()
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.tolist())
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "keys") and hasattr(value, "start"):  # spill.InputRows
        return [value.path, value.start, value.stop, _plain(value.keys), _plain(value.take), _plain(value.payload)]
    return repr(value)


def _outputs(fn, ranges):
    out = []
    for item in ranges:
        for o in fn.process(item):
            tag, value = (o.tag, o.value) if isinstance(o, beam.pvalue.TaggedOutput) else ("infos", o)
            out.append((tag, _plain(value)))
    return out


def _sequential(fn):
    """The reader without its helper thread: each batch read when its turn comes."""

    def read_in_turn(item):
        lf = item.file
        for batch, start, n in fn._metadata_batches(item):
            n_vec = max(0, min(start + n, lf.n_vectors) - start) if batch is not None else 0
            vecs = fn.vectors.rows(lf.npy, start, start + n_vec) if n_vec else np.empty((0, lf.dim), np.float32)
            yield batch, start, n, vecs, row_norms(vecs)

    fn._read_ahead = read_in_turn
    return fn


def test_outputs_equal_a_batch_by_batch_read(tmp_path):
    ranges = _layout(tmp_path)
    settings = LaionSettings(batch_rows=300)
    ahead, plain = ReadRangeFn(settings, buckets=2), _sequential(ReadRangeFn(settings, buckets=2))
    ahead.setup()
    plain.setup()
    got = _outputs(ahead, ranges)
    assert got == _outputs(plain, ranges) and len(got) > 20
    assert ahead._ahead is not None  # the helper was used
    ahead.teardown()
    plain.teardown()
    assert ahead._ahead is None


def test_a_read_error_surfaces_in_process(tmp_path, monkeypatch):
    ranges = _layout(tmp_path, files=1)
    real = laion_files.NpyRows.rows
    calls = []

    def failing(self, start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(self, start, stop)

    monkeypatch.setattr(laion_files.NpyRows, "rows", failing)
    fn = ReadRangeFn(LaionSettings(batch_rows=300))
    fn.setup()
    with pytest.raises(OSError, match="disk gone"):
        _outputs(fn, ranges)
    fn.teardown()


def test_a_range_left_half_read_frees_the_helper(tmp_path):
    ranges = _layout(tmp_path)
    fn = ReadRangeFn(LaionSettings(batch_rows=300), buckets=2)
    fn.setup()
    first = fn.process(ranges[0])
    next(first)
    first.close()  # the consumer stops early (a failed bundle): the batch in flight is waited for
    whole = _outputs(fn, ranges)
    fresh = ReadRangeFn(LaionSettings(batch_rows=300), buckets=2)
    fresh.setup()
    assert whole == _outputs(fresh, ranges)
    fn.teardown()
    fresh.teardown()
