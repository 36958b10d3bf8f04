"""Parquet parts written on helper threads (transforms.write.BackgroundWrites): the same bytes as
``write_arrow`` in the caller's thread, every file in place after ``wait``, errors raised there."""

import os

import pyarrow as pa
import pytest

from transforms.write import BackgroundWrites, write_arrow


def _table(i: int) -> pa.Table:
    return pa.table({"key": [f"k{i}-{j:04d}" for j in range(500)], "n": list(range(i, i + 500))})


def test_same_bytes_as_write_arrow_and_all_in_place(tmp_path):
    writes = BackgroundWrites(limit=2)
    paths = [writes.submit(str(tmp_path / "bg" / f"part-{i}.parquet"), _table(i)) for i in range(7)]
    assert len(writes.pending) <= 2  # bounded: older writes were waited for
    writes.wait()
    assert writes.pending == []
    for i, path in enumerate(paths):
        write_arrow(str(tmp_path / "fg" / f"part-{i}.parquet"), _table(i))
        with open(path, "rb") as a, open(tmp_path / "fg" / f"part-{i}.parquet", "rb") as b:
            assert a.read() == b.read()
    assert sorted(os.listdir(tmp_path / "bg")) == sorted(os.path.basename(p) for p in paths)  # no temporaries


def test_error_raised_at_wait_after_the_others_finish(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    writes = BackgroundWrites(limit=10)
    writes.submit(str(blocker / "part-0.parquet"), _table(0))
    good = writes.submit(str(tmp_path / "ok" / "part-1.parquet"), _table(1))
    with pytest.raises(OSError):
        writes.wait()
    assert os.path.isfile(good)
    assert writes.pending == []
    writes.wait()  # nothing left: no error twice
