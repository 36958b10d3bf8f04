"""transforms.write: parts written on helper threads (BackgroundWrites: the same bytes as
``write_arrow`` in the caller's thread, every file in place after ``wait``, errors raised there),
and Arrow partition labels split as pandas' factorize splits them."""

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


def test_arrow_partition_labels_factorize_as_pandas():
    import numpy as np
    import pandas as pd

    from transforms.write import _factorized, _partition_lists

    labels = pa.chunked_array([["s1", "s0", "s1"], ["s2", "s0"]])
    codes, names = _factorized(labels)
    want_codes, want_names = pd.factorize(np.asarray(labels, dtype=object))
    assert codes.tolist() == want_codes.tolist() and list(names) == list(want_names) == ["s1", "s0", "s2"]
    table = pa.table({"key": list("abcde"), "shard": labels})
    parts = dict(_partition_lists(table, None, lambda t: t["shard"]))
    assert {k: v.column("key").to_pylist() for k, v in parts.items()} == {
        "s1": ["a", "c"],
        "s0": ["b", "e"],
        "s2": ["d"],
    }
    with_null = pa.array(["s1", None, "s1"])  # nulls: pandas' way (the null row in no partition)
    assert _factorized(with_null)[0].tolist() == pd.factorize(np.asarray(with_null, dtype=object))[0].tolist()
    assert list(_partition_lists(table.slice(0, 0), None, lambda t: t["shard"])) == []
