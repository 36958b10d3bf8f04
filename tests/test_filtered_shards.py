"""Filtered shards and manifest readers, as training teams use them."""

import json
import tarfile

import pytest

from tests.shardkit import jpeg_bytes, sample, write_shard
from transforms.filtered_shards import filter_shard, filter_with_manifest, kept_by_shard
from transforms.write import read_table


def _kept_keys(run_dir) -> set[str]:
    manifest = read_table(str(run_dir / "manifest")).to_pylist()
    return {r["key"] for r in manifest if r["status"] == "ok" and r["decision"] in ("keep", "diversify")}


def _input_members(demo_data) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted((demo_data / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and "." in m.name:
                    key, ext = m.name.split(".", 1)
                    out.setdefault(f"{path.stem}/{key}", {})[ext] = tar.extractfile(m).read()
    return out


def test_manifest_reads_with_pyarrow_pandas_duckdb(demo_run):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    table = ds.dataset(str(demo_run / "manifest"), format="parquet").to_table()
    frame = pd.read_parquet(demo_run / "manifest")
    glob = f"{demo_run}/manifest/*.parquet"
    n, distinct = duckdb.sql(f"select count(*), count(distinct key) from read_parquet('{glob}')").fetchall()[0]
    assert table.num_rows == len(frame) == n == distinct == 104
    by_duckdb = dict(duckdb.sql(f"select decision, count(*) from read_parquet('{glob}') group by decision").fetchall())
    assert by_duckdb == frame["decision"].value_counts().to_dict()
    assert set(by_duckdb) == {"keep", "drop", "diversify"}
    # the list column reads as a list everywhere
    unnested = duckdb.sql(f"select count(*) from (select unnest(reasons) from read_parquet('{glob}'))").fetchall()[0][0]
    assert unnested == sum(len(r) for r in frame["reasons"]) == sum(len(r) for r in table.column("reasons").to_pylist())


def test_filtered_shards_hold_exactly_the_kept_keys(demo_run, demo_data):
    import webdataset as wds

    kept = _kept_keys(demo_run)
    diversified = {r["key"]: r for r in read_table(str(demo_run / "diversify")).to_pylist()}
    originals = _input_members(demo_data)
    urls = sorted(str(p) for p in (demo_run / "filtered").glob("*.tar"))
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(s["json"])
        seen[s["__key__"]] = meta["memsieve"]
        original = originals[f"{s['__url__'].rsplit('/', 1)[1][:-4]}/{s['__key__']}"]
        assert s["txt"] == original["txt"]  # the original caption, byte for byte
        assert all(s[ext] == data for ext, data in original.items() if ext != "json")  # images not re-encoded
        assert {k: v for k, v in meta.items() if k != "memsieve"} == json.loads(original["json"])
    assert set(seen) == kept
    assert diversified and set(diversified) <= kept
    for key, row in diversified.items():
        block = seen[key]
        assert block["decision"] == "diversify" and block["reasons"]
        assert block["alternatives"] == row["alternatives"] and block["strategies"] == row["alternative_strategies"]
        assert block["gaussian_noise_sigma"] == pytest.approx(0.1) and block["train_probability"] == pytest.approx(0.1)
    assert all(not seen[k]["alternatives"] for k in kept - set(diversified))


def test_filter_existing_shards_by_manifest(demo_run, demo_data):
    """docs/filtering.md: the webdataset library over the original shards, selected by the manifest."""
    urls = sorted(str(p) for p in (demo_data / "shards").glob("*.tar"))
    got = {s["__key__"]: json.loads(s["json"])["memsieve"] for s in filter_with_manifest(urls, str(demo_run))}
    assert set(got) == _kept_keys(demo_run)
    alts = {r["key"]: r["alternatives"] for r in read_table(str(demo_run / "diversify")).to_pylist()}
    assert all(got[k]["alternatives"] == a for k, a in alts.items())


def test_filter_shard_on_a_damaged_shard(tmp_path):
    """Kept keys only, in key order; a shard cut mid-member still gives the samples before the break."""
    members = [sample(f"k{i}", caption=f"caption {i}", image=jpeg_bytes(i)) for i in range(4)]
    path = write_shard(str(tmp_path / "in.tar"), members)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"caption 3") - 600])  # inside the last sample
    kept = {
        "k2": {"decision": "keep", "reasons": []},
        "k0": {"decision": "diversify", "reasons": ["x"]},
        "k3": {"decision": "keep", "reasons": []},
    }
    assert filter_shard(str(cut), kept, str(tmp_path / "out.tar")) >= 2
    with tarfile.open(tmp_path / "out.tar") as tar:
        names = tar.getnames()
    assert [n for n in names if n.endswith(".txt")][:2] == ["k0.txt", "k2.txt"] and "k1.txt" not in names
    assert not list(tmp_path.glob("out.tar.tmp-*"))
    assert kept_by_shard(str(tmp_path / "no-run")) == {}
