"""The LAION precomputed-embedding layout through the shared graph, on small generated folders."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_job, parse_config
from pipeline.job import run_job
from transforms import ann
from transforms.write import read_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_laion_embeddings import PLANTED_WORDS, generate, write  # noqa: E402

JOB = os.path.join(ROOT, "jobs", "laion_embeddings.yaml")
ROWS = 3000


@pytest.fixture(scope="module")
def data():
    return generate(ROWS, 64, seed=3, topics=40, trigger_group=40)


def _run(folder, out, **overrides):
    sets = ["output.report=false", "dedup.keeper=earliest"] + [f"{k}={v}" for k, v in overrides.items()]
    return run_job(load_job(JOB, sets, input_path=str(folder), output_dir=str(out)))


@pytest.fixture(scope="module")
def planted(data, tmp_path_factory):
    """The job over a folder with planted triggers (3 files, metadata row groups of 400 rows)."""
    root = tmp_path_factory.mktemp("laion")
    keys = write(str(root / "emb"), *data, files=3, row_group_rows=400)
    info = _run(root / "emb", root / "out")
    return root, keys, info


def _partition(labels) -> set[frozenset]:
    groups: dict = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_full_layout_every_key_once(planted, data):
    root, keys, info = planted
    out = root / "out"
    for table in ("manifest", "annotations", "clusters", "neighbours", "triggers/keywords", "blocklist", "shards"):
        assert read_table(str(out / table)) is not None, table
    assert (out / "run.json").is_file() and (out / "blocklist.txt").is_file()
    rows = read_table(str(out / "manifest")).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(keys) and info["summary"]["keys"] == ROWS
    assert info["input"]["format"] == "laion_embeddings" and info["input"]["rows"] == ROWS
    # clusters are exactly the components of the cosine >= 0.9 graph: no pair lost, and no false
    # merge (every row's sha256 is empty: empty digests must not link rows)
    index = {k: i for i, k in enumerate(keys)}
    by_row = [""] * ROWS
    for r in rows:
        by_row[index[r["key"]]] = r["cluster_id"]
    truth = ann.exact_pairs(data[0], 0.9)
    a, b = (np.array(x, dtype=np.int64) for x in zip(*truth, strict=True))
    assert _partition(by_row) == _partition(ann.components(ROWS, a, b).tolist())
    for members in _group(rows).values():  # earliest key kept, the others dropped
        assert [m["key"] for m in members if m["decision"] != "drop"] == [min(m["key"] for m in members)]
    info_rows = {r["key"]: r for r in read_table(str(out / "annotations")).to_pylist()}
    assert info_rows[keys[0]]["width"] > 0 and info_rows[keys[0]]["caption"]


def _group(rows):
    out: dict = {}
    for r in rows:
        if r["cluster_size"] > 1:
            out.setdefault(r["cluster_id"], []).append(r)
    return out


def test_planted_triggers_found(planted):
    root, keys, _ = planted
    truth = json.loads((root / "emb" / "truth" / "planted.json").read_text())
    manifest = {r["key"]: r for r in read_table(str(root / "out" / "manifest")).to_pylist()}
    cluster = {manifest[k]["cluster_id"] for k in truth["group_keys"]}
    assert len(cluster) == 1
    found = {r["keyword"]: r for r in read_table(str(root / "out" / "triggers" / "keywords")).to_pylist()}
    for word in PLANTED_WORDS:
        assert word in found and found[word]["q_value"] <= 0.01
        assert found[word]["cluster_id"] in cluster
    assert any(f"word_trigger:{PLANTED_WORDS[0]}" in (manifest[k]["trigger_codes"] or []) for k in truth["group_keys"])


def test_shuffled_captions_find_no_trigger(data, tmp_path):
    write(str(tmp_path / "emb"), *data, files=2, shuffle_captions=True)
    _run(tmp_path / "emb", tmp_path / "out", **{"diversify.enabled": "false"})
    table = read_table(str(tmp_path / "out" / "triggers" / "keywords"))
    words = set(table.column("keyword").to_pylist()) if table is not None else set()
    assert not words & set(PLANTED_WORDS), words


def test_redecide_keeps_duplicates(planted, tmp_path):
    import shutil

    root, keys, _ = planted
    out = tmp_path / "run"
    shutil.copytree(root / "out", out)
    before = read_table(str(out / "manifest")).to_pylist()
    assert any(r["decision"] == "drop" for r in before)
    cmd = [sys.executable, "-m", "pipeline.cli", "decide", str(out), "--set", "decide.drop_duplicates=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = read_table(str(out / "manifest")).to_pylist()
    assert sorted(r["key"] for r in after) == sorted(keys)
    assert not [r for r in after if r["decision"] == "drop"]
    assert json.loads((out / "run.json").read_text())["config"]["decide"]["drop_duplicates"] is False


def _bad_folder(root):
    """Two files: NaN, zero and caption-less rows, a key repeated across files, 3 vectors more
    than metadata rows in file 0 and 2 metadata rows more than vectors in file 1; file 2 has no
    metadata at all."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "img_emb")
    os.makedirs(root / "metadata")
    v0 = rng.standard_normal((23, 16)).astype(np.float16)
    v0[1] = np.nan
    v0[2] = 0
    np.save(root / "img_emb" / "img_emb_0.npy", v0)
    keys0 = [f"a{i:03d}" for i in range(20)]
    caps0 = [f"caption {i}" for i in range(20)]
    caps0[3] = "  "
    pq.write_table(
        pa.table({"key": keys0, "caption": caps0, "url": [f"u{i}" for i in range(20)]}),
        root / "metadata" / "metadata_0.parquet",
    )
    np.save(root / "img_emb" / "img_emb_1.npy", rng.standard_normal((8, 16)).astype(np.float16))
    keys1 = [f"b{i:03d}" for i in range(10)]
    keys1[4] = "a005"  # also in file 0
    pq.write_table(
        pa.table({"key": keys1, "caption": [f"other {i}" for i in range(10)]}), root / "metadata" / "metadata_1.parquet"
    )
    np.save(root / "img_emb" / "img_emb_2.npy", rng.standard_normal((4, 16)).astype(np.float16))
    return keys0 + [f"metadata_0:{i:09d}" for i in range(20, 23)] + keys1 + [f"metadata_2:{i:09d}" for i in range(4)]


def test_bad_rows_are_dead_letters_and_every_key_is_in_the_manifest(tmp_path):
    expected = _bad_folder(tmp_path / "emb")
    info = _run(tmp_path / "emb", tmp_path / "out", **{"triggers.enabled": "false", "run.max_failure_ratio": "0.9"})
    manifest = read_table(str(tmp_path / "out" / "manifest")).to_pylist()
    assert sorted(r["key"] for r in manifest) == sorted(set(expected))  # a005 once
    failures = {(r["key"], r["error_type"]) for r in read_table(str(tmp_path / "out" / "failures")).to_pylist()}
    assert {("a001", "bad_vector"), ("a002", "bad_vector"), ("a003", "missing_caption")} <= failures
    assert {(f"metadata_0:{i:09d}", "row_count_mismatch") for i in range(20, 23)} <= failures
    assert {("b008", "row_count_mismatch"), ("b009", "row_count_mismatch"), ("a005", "duplicate_key")} <= failures
    assert {(f"metadata_2:{i:09d}", "missing_metadata") for i in range(4)} <= failures
    status = {r["key"]: r["status"] for r in manifest}
    assert status["a000"] == "ok" and status["a005"] == "ok" and status["a001"] == "failed"
    events = {r["shard"]: r["events"] for r in read_table(str(tmp_path / "out" / "shards")).to_pylist()}
    assert any("row_count_mismatch" in e for e in events["metadata_0"])
    assert info["summary"]["failed"] == 3 + 3 + 2 + 4


def test_settings_that_need_pixels_exit_2(tmp_path):
    _bad_folder(tmp_path / "emb")
    for setting in ("dedup.clip.enabled=true", "output.filtered_shards=true"):
        cfg = load_job(JOB, [setting], input_path=str(tmp_path / "emb"), output_dir=str(tmp_path / "out"))
        with pytest.raises(ConfigError, match=setting.split("=")[0]):
            run_job(cfg)
    assert not (tmp_path / "out").exists()  # refused before the output folder was touched
    with pytest.raises(ConfigError, match="input.format"):
        run_job(parse_config({"name": "x", "input": {"path": str(tmp_path / "emb"), "format": "webdataset"}}))


def test_laion_graph_has_only_bounded_globals(tmp_path):
    """Issue 10, acceptance 5 on this layout: the reader adds no global combine or side input."""
    import apache_beam as beam

    from pipeline.graph import build_graph, read_input
    from tests.test_graph_inventory import ALLOWED, _unlisted, inventory

    _bad_folder(tmp_path / "emb")
    cfg = load_job(JOB, ["probe.enabled=false"], input_path=str(tmp_path / "emb"), output_dir=str(tmp_path / "out"))
    p = beam.Pipeline()
    build_graph(p, cfg, read_input(p, cfg, "laion_embeddings", [str(tmp_path / "emb")], str(tmp_path / "out")), "")
    found = inventory(p)
    assert any(label.startswith("VectorEdges_clip/") for label in found)
    assert not any(label.startswith("ReadLaion/") for label in found)
    assert _unlisted(found, ALLOWED) == {}
    assert not any(label.startswith("Annotate/") for label in found)
