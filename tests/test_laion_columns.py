"""The LAION reader's columnar rules: each failure reason, synthetic keys, repeated keys within a
range and across files, meta_json content, sizes, key hashes and unit float16 rows."""

import datetime
import json
import math
import os
import pickle

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transforms import laion_rows as lr
from transforms import row_blobs, spill
from transforms.key_arrays import SeenKeys, bucket_repeats, key_hashes, split_key_arrays
from transforms.key_batches import _repeats
from transforms.laion_files import list_files, plan_ranges
from transforms.read_laion import (
    UNIT_TOL,
    LaionSettings,
    ReadLaion,
    ReadRangeFn,
    repeated_keys,
    row_norms,
    unit_float16,
)

DIM = 8


def _write(root, n: int, vectors: np.ndarray | None, table: pa.Table | None, row_group_rows: int = 1000):
    os.makedirs(root / "img_emb", exist_ok=True)
    os.makedirs(root / "metadata", exist_ok=True)
    if vectors is not None:
        np.save(root / "img_emb" / f"img_emb_{n}.npy", vectors)
    if table is not None:
        pq.write_table(table, root / "metadata" / f"metadata_{n}.parquet", row_group_size=row_group_rows)


def _unit(rows: int, seed: int = 0, dtype=np.float16) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _read(root, settings=LaionSettings(), range_rows: int = 65_536) -> dict:
    """ReadRangeFn over every planned range, outputs by tag."""
    fn = ReadRangeFn(settings, buckets=3)
    fn.setup()
    out: dict[str, list] = {"infos": [], "failures": [], "vectors": [], "keys": []}
    for item in plan_ranges(list_files(str(root)), range_rows):
        for o in fn.process(item):
            if isinstance(o, beam.pvalue.TaggedOutput):
                out[o.tag].append(o.value)
            else:
                out["infos"].append(o)
    fn.teardown()
    return out


def _infos(out) -> list[dict]:
    return [r for t in out["infos"] for r in t.to_pylist()]


def _failed(out) -> dict:
    return {f.key: (f.stage, f.error_type) for f in out["failures"]}


def test_each_failure_reason_and_synthetic_keys(tmp_path):
    """One file, a row per rule; the first failing rule in the reader's order wins."""
    v = _unit(14)
    v[1] = np.nan
    v[2, 0] = np.inf
    v[3] = 0
    v[9] = np.nan  # also a bad status: the status wins
    v[10] = 0  # also no caption: the bad vector wins
    rows = {
        "key": ["ok0", "nan", "inf", "zero", "long", "nocap", "blank", " ", None, "both", "vecfirst", "ok0", "ok11"],
        "caption": ["a", "b", "c", "d", "é" * 6, None, "  \t", "e", "f", "g", None, "h", "\x1c padded\x85"],
        "status": ["success", None, "", "success", "success", "success", "success", "success", "success"]
        + ["failed_to_download", "success", "success", "success"],
        "error_message": [None] * 9 + ["HTTP 404", None, None, None],
        "url": [f"u{i}" for i in range(13)],
    }
    _write(tmp_path, 0, v, pa.table(rows))  # 14 vectors, 13 metadata rows
    out = _read(tmp_path, LaionSettings(max_caption_bytes=11))
    assert _failed(out) == {
        "nan": ("read", "bad_vector"),
        "inf": ("read", "bad_vector"),
        "zero": ("read", "bad_vector"),
        "long": ("read", "caption_too_long"),  # 6 characters, 12 UTF-8 bytes
        "nocap": ("read", "missing_caption"),
        "blank": ("read", "missing_caption"),  # whitespace only
        "both": ("download", "failed_to_download"),
        "vecfirst": ("read", "bad_vector"),
        "ok0": ("read", "duplicate_key"),  # row 11 repeats row 0's key in the range
        "metadata_0:000000013": ("read", "row_count_mismatch"),  # a vector without a metadata row
    }
    by_key = {f.key: f for f in out["failures"]}
    assert by_key["both"].message == "HTTP 404" and by_key["both"].url == "u9"
    assert by_key["ok0"].message == "row 11: the key repeats in metadata_0"
    infos = {r["key"]: r for r in _infos(out)}
    # an empty or blank key gets the synthetic key (file and row)
    assert sorted(infos) == ["metadata_0:000000007", "metadata_0:000000008", "ok0", "ok11"]
    assert infos["ok11"]["caption"] == "padded" and infos["ok0"]["url"] == "u0"
    assert infos["ok0"]["shard"] == "metadata_0" and infos["ok0"]["pixel_sha256"] == ""
    keys, vecs = zip(*(row_blobs.rows_of(b)[:2] for b in out["vectors"]), strict=True)
    assert sorted(k for ks in keys for k in ks) == sorted(infos)
    assert all(x.dtype == np.float16 for x in vecs)


def test_no_caption_allowed_and_status_message_falls_back(tmp_path):
    """Captions optional; a bad status without a message names itself; a metadata row without a
    vector is a row-count mismatch whatever its status."""
    table = pa.table(
        {"key": ["a", "b", "c", "d"], "caption": [None, "x", "y", "z"], "status": [None, "oops", "success", "oops"]}
    )
    _write(tmp_path, 0, _unit(3), table)
    out = _read(tmp_path, LaionSettings(require_caption=False))
    assert _failed(out) == {"b": ("download", "oops"), "d": ("read", "row_count_mismatch")}
    assert [f.message for f in out["failures"]][0] == "oops"
    assert sorted(r["key"] for r in _infos(out)) == ["a", "c"]


def test_missing_files_fail_every_row(tmp_path):
    _write(tmp_path, 0, None, pa.table({"key": ["a", "b"], "caption": ["x", "y"]}))
    _write(tmp_path, 1, _unit(3), None)
    out = _read(tmp_path)
    assert _failed(out) == {
        "a": ("read", "missing_vector"),
        "b": ("read", "missing_vector"),
        **{f"metadata_1:{i:09d}": ("read", "missing_metadata") for i in range(3)},
    }
    assert not out["infos"] and not out["vectors"]


def test_keys_repeated_across_ranges_and_files(tmp_path):
    """Within one range a repeat is dropped in the reader; across ranges (row groups of 4 rows,
    ranges of 4) and across files it reaches the bucket groups, which report every occurrence
    after the first (shard, row) and mark those outside the key's first shard as moved."""
    k0 = [f"a{i}" for i in range(10)]
    k0[6] = "a1"  # another range of the same file
    k1 = ["b0", "a1", "b2", "a9"]  # a1 and a9 also in file 0
    _write(tmp_path, 0, _unit(10), pa.table({"key": k0, "caption": ["c"] * 10}), row_group_rows=4)
    _write(tmp_path, 1, _unit(4, 1), pa.table({"key": k1, "caption": ["c"] * 4}), row_group_rows=4)
    out = _read(tmp_path, range_rows=4)
    assert not out["failures"]  # no repeat inside a range
    assert {kv[0] for kv in out["keys"]} <= {0, 1, 2}
    shipped = sorted(
        (s, k, int(r)) for _, (s, keys, rows) in out["keys"] for k, r in zip(keys.to_pylist(), rows, strict=True)
    )
    expected = [("metadata_0", k, i) for i, k in enumerate(k0)] + [("metadata_1", k, i) for i, k in enumerate(k1)]
    assert shipped == sorted(expected)
    by_bucket: dict = {}
    for b, piece in out["keys"]:
        by_bucket.setdefault(b, []).append(piece)
    found, moved = [], []
    for item in by_bucket.items():
        for o in bucket_repeats(item, repeated_keys):
            if isinstance(o, beam.pvalue.TaggedOutput):
                moved.append(o.value)
            else:
                found.append(o)
    assert sorted((f.key, f.shard, f.message) for f in found) == [
        ("a1", "metadata_0", "row 6: the key also appears in metadata_0 row 1"),
        ("a1", "metadata_1", "row 1: the key also appears in metadata_0 row 1"),
        ("a9", "metadata_1", "row 3: the key also appears in metadata_0 row 9"),
    ]
    assert sorted(moved) == [("metadata_1", "a1"), ("metadata_1", "a9")]


def test_bucket_repeats_match_the_row_lists(tmp_path):
    """The array variant gives what ``key_batches``' per-tuple grouping gives on the same keys."""
    rng = np.random.default_rng(5)
    pieces, pairs = [], []
    for s in range(4):
        keys = [f"k{int(x)}" for x in rng.integers(0, 300, size=120)]
        rows = np.arange(len(keys)) + 1000 * s
        pieces.append((f"shard_{s}", pa.array(keys), rows))
        pairs += [(k, (f"shard_{s}", int(r))) for k, r in zip(keys, rows, strict=True)]

    def run(gen):
        fails, moved = [], []
        for o in gen:
            if isinstance(o, beam.pvalue.TaggedOutput):
                moved.append(o.value)
            else:
                fails.append(o)
        return sorted(fails, key=lambda f: (f.key, f.shard, f.message)), sorted(moved)

    new = run(bucket_repeats((0, pieces), repeated_keys))
    old = run(_repeats((0, [pairs]), repeated_keys, lambda w: w[0]))
    assert new == old and len(new[0]) > 50 and new[1]


def test_seen_keys_and_hash_buckets():
    seen = SeenKeys()
    a = pa.array(["x", "y", "x", "z"])
    first = seen.first(a, key_hashes(a))
    assert first.tolist() == [True, True, False, True]
    seen.add(a.filter(pa.array(first)), key_hashes(a)[first], np.flatnonzero(first))
    b = pa.array(["w", "y", "v", "w"])
    assert seen.first(b, key_hashes(b)).tolist() == [True, False, True, False]
    keys = pa.array([f"key{i}" for i in range(2000)])
    parts = list(split_key_arrays("s", keys, np.arange(2000), 4))
    assert [p[0] for p in parts] == [0, 1, 2, 3] and all(350 < len(p[1][1]) < 650 for p in parts)
    back = sorted((int(r), k) for _, (_, ks, rows) in parts for k, r in zip(ks.to_pylist(), rows, strict=True))
    assert back == [(i, f"key{i}") for i in range(2000)]
    buckets = key_hashes(keys) % np.uint64(4)
    assert all((buckets[p[1][2]] == p[0]).all() for p in parts)


def _reference_hash(key: str) -> int:
    """The same hash (FNV-1a, the length, MurmurHash3's finaliser), one Python int at a time."""
    m = 2**64
    b = key.encode("utf-8")
    h = 0xCBF29CE484222325
    for byte in b:
        h = ((h ^ byte) * 0x100000001B3) % m
    h ^= len(b)
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h = ((h ^ (h >> 33)) * mult) % m
    return h ^ (h >> 33)


def test_key_hashes_equal_a_per_key_reference():
    keys = ["", "a", "ab", "ba", "é", "日本語のキー", "x" * 300, "", "00000000001"]
    arr = pa.array(["pad", *keys]).slice(1)  # a sliced array hashes its own rows
    got = key_hashes(arr).tolist()
    assert got == [_reference_hash(k) for k in keys]
    assert got[1] != got[2] and got[2] != got[3] and got[0] == got[7]
    assert key_hashes(pa.array(keys, pa.large_string())).tolist() == got


def test_stripped_is_str_strip():
    chars = [chr(c) for c in range(0x3100)] + ["\ufeff", "\U0001f600"]
    padded = [f"{c}x{c}" for c in chars]
    assert lr.stripped(pa.array(padded)).to_pylist() == [p.strip() for p in padded]


def _old_meta(values: dict) -> str:
    def value(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v.hex() if isinstance(v, bytes) else v

    return json.dumps({c: value(v) for c, v in values.items()}, sort_keys=True, default=str)


def test_meta_json_content_equals_the_per_row_json():
    n = 7
    batch = pa.record_batch(
        {
            "zeta": pa.array([1, None, -3, 2**40, 0, 5, 6], pa.int64()),
            "alpha": pa.array([0.3821, float("nan"), float("inf"), 1.0, 1e-05, 1e16, None]),
            "f32": pa.array([0.1, 2.0, None, -0.0, 3.5, 1e-8, 7.25], pa.float32()),
            "flag": pa.array([True, False, None, True, True, False, True]),
            "text": ['a "q" \\ b', "line\nbreak\ttab", "\x01ctrl", "unicodé ☃", None, "cr\r", "\x1f"],
            "blob": pa.array([b"\x00\xff", None, b"", b"ab", b"c", b"d", b"e"]),
            "tags": pa.array([[1, 2], None, [], [3], [4], [5], [6]]),
            "obj": pa.array([{"b": 1, "a": "x"}] * n),
            "when": pa.array([datetime.datetime(2020, 1, 2)] * n, pa.timestamp("s")),
            "cat": pa.array(["p", "q", "p", None, "q", "p", "p"]).dictionary_encode(),
        }
    )
    others = sorted(batch.schema.names)
    got = lr.meta_json(batch, others).to_pylist()
    rows = batch.to_pylist()
    for text, row in zip(got, rows, strict=True):
        parsed, expected = json.loads(text), json.loads(_old_meta(row))
        assert parsed == expected
        assert list(parsed) == sorted(parsed)  # keys sorted
        for k, v in expected.items():
            assert type(parsed[k]) is type(v), (k, v, parsed[k])  # 1.0 stays a float
    assert json.loads(got[0])["alpha"] == 0.3821 and json.loads(got[1])["alpha"] is None
    assert json.loads(got[0])["blob"] == "00ff" and json.loads(got[2])["text"] == "\x01ctrl"
    assert lr.meta_json(batch, []).to_pylist() == ["{}"] * n


def test_sizes_are_int_of_finite_positive_values():
    batch = pa.record_batch(
        {
            "width": pa.array([3.7, float("nan"), -2.0, None, float("inf")]),
            "height": pa.array([5, None, -1, 0, 7]),
            "original_width": pa.array(["12", "x", None, "3.9", "-4"]),
        }
    )
    assert lr.int_column(batch, "width", 5).tolist() == [3, 0, 0, 0, 0]
    assert lr.int_column(batch, "height", 5).tolist() == [5, 0, 0, 0, 7]
    assert lr.int_column(batch, "original_width", 5).tolist() == [12, 0, 0, 3, 0]
    assert lr.int_column(batch, "original_height", 5).tolist() == [0] * 5


@pytest.mark.parametrize("scale", [1.0, 1 + UNIT_TOL * 0.99, 1 - UNIT_TOL * 0.99, 1.01])
def test_unit_float16_equals_the_division(scale):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    v = (x / np.linalg.norm(x, axis=1, keepdims=True) * scale).astype(np.float16)
    x32 = v.astype(np.float32)
    norms = np.linalg.norm(x32, axis=1)
    rows = np.arange(0, 3000, 2)
    expected = (x32[rows] / norms[rows, None]).astype(np.float16)
    assert np.array_equal(row_norms(v, chunk=100), norms)
    assert np.array_equal(unit_float16(v, norms, rows), expected)
    assert np.array_equal(unit_float16(v, norms, None), (x32 / norms[:, None]).astype(np.float16))
    v32 = v.astype(np.float32)  # float32 rows: always divided
    assert np.array_equal(unit_float16(v32, norms, rows), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_unit_float16_rows_travel_as_input_references(tmp_path, dtype):
    """Unit float16 rows (all good, or some rows failed) become ``spill.InputRows`` that read back
    the same keys and vectors as the copied batches (``reread_vectors=False``); float32 or
    non-unit rows are copied."""

    def exact_unit(n: int, seed: int) -> np.ndarray:  # exactly unit in float16: +-1 or four +-0.5
        rng = np.random.default_rng(seed)
        x = np.zeros((n, DIM), dtype=dtype)
        for i in range(n):
            at = rng.choice(DIM, 1 + 3 * (i % 2), replace=False)
            x[i, at] = rng.choice([-1, 1], len(at)) / np.sqrt(len(at))
        return x

    v = exact_unit(10, 5)
    v[3] = np.nan  # a bad row: the reference keeps the others
    _write(tmp_path, 0, v, pa.table({"key": [f"k{i}" for i in range(10)], "caption": ["c"] * 10}), row_group_rows=4)
    _write(tmp_path, 1, exact_unit(6, 6), pa.table({"key": [f"m{i}" for i in range(6)], "caption": ["c"] * 6}))
    settings = LaionSettings(batch_rows=4)
    refs, copies = (
        _read(tmp_path, settings)["vectors"],
        _read(tmp_path, LaionSettings(batch_rows=4, reread_vectors=False))["vectors"],
    )
    assert len(refs) == len(copies) == 5 and all(isinstance(c, tuple) for c in copies)
    assert all(isinstance(r, spill.InputRows) for r in refs) == (dtype == np.float16)
    for ref, (keys, unit) in zip(refs, copies, strict=True):
        sent = pickle.loads(pickle.dumps(ref))  # past a stage boundary: the rows are read again from the file
        assert not isinstance(ref, spill.InputRows) or (ref.payload is not None and sent.payload is None)
        for batch in (ref, sent):
            k, p = row_blobs.rows_of(batch)[:2]
            assert list(k) == keys and p.dtype == np.float16 and np.array_equal(p.reshape(len(p), -1), unit)
    assert [len(r.take) if isinstance(r, spill.InputRows) and r.take is not None else None for r in refs][:2] == (
        [3, None] if dtype == np.float16 else [None, None]
    )


def test_float16_norms_equal_numpys_bit_for_bit():
    """The squares table gives np.linalg.norm's float32 norms, specials and subnormals included."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 512)).astype(np.float32)
    v = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    v[0, 5], v[1, 7], v[2] = np.inf, np.nan, 0
    v[3] = np.float16(3e-7)  # subnormal in float16
    v[4] = np.float16(60000)  # big: squares past float16, well within float32
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.linalg.norm(v.astype(np.float32), axis=1)
    got = row_norms(v, chunk=300)
    assert got.dtype == np.float32 and np.array_equal(got, expected, equal_nan=True)
    assert np.isnan(got[1]) and np.isinf(got[0]) and got[2] == 0 and 0 < got[3] < 1e-5


def test_read_laion_pipeline_reports_cross_file_repeats(tmp_path):
    from apache_beam.testing.util import assert_that, equal_to

    _write(tmp_path, 0, _unit(5), pa.table({"key": ["a", "b", "c", "d", "e"], "caption": ["x"] * 5}))
    _write(tmp_path, 1, _unit(3, 2), pa.table({"key": ["f", "c", "g"], "caption": ["x"] * 3}))
    files = list_files(str(tmp_path))
    with beam.Pipeline() as p:
        out = p | ReadLaion(files, plan_ranges(files), LaionSettings(), buckets=2)
        fails = out["failures"] | beam.Map(lambda f: (f.key, f.shard, f.error_type))
        assert_that(fails, equal_to([("c", "metadata_1", "duplicate_key")]), label="failures")
        assert_that(out["moved"], equal_to([("metadata_1", "c")]), label="moved")
        rows = out["info_batches"] | beam.FlatMap(lambda t: t.column("key").to_pylist())
        assert_that(rows, equal_to(list("abcdefcg")), label="infos")


class _NoReadinto:
    """A file object with only seek and read, as some filesystems' are."""

    def __init__(self, path):
        self.f = open(path, "rb")

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()

    def read(self, n=-1):
        return self.f.read(min(n, 100) if n and n > 0 else n)  # short reads too

    def readline(self, *a):
        return self.f.readline(*a)

    def close(self):
        self.f.close()


@pytest.mark.parametrize("plain_read", [False, True])
def test_npy_rows_read_what_numpy_loads(tmp_path, monkeypatch, plain_read):
    from transforms import laion_files

    v = np.random.default_rng(3).standard_normal((50, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", v)
    if plain_read:
        monkeypatch.setattr(laion_files, "open_file", _NoReadinto)
    src = laion_files.VectorSource()
    assert np.array_equal(src.rows(str(tmp_path / "x.npy"), 3, 41), v[3:41])
    assert np.array_equal(src.rows(str(tmp_path / "x.npy"), 49, 50), v[49:])
    assert src.rows(str(tmp_path / "x.npy"), 5, 5).shape == (0, 7)
    with pytest.raises(EOFError):
        src.rows(str(tmp_path / "x.npy"), 45, 60)
    src.close()
