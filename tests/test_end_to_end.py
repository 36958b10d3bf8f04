"""End to end: real shards and shards full of bad records, with exact counts."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from pipeline.job import run_job
from schemas.run_summary import RunSummary
from tests.shardkit import jpeg_bytes, sample, write_shard
from transforms.write import read_table


def _cfg(input_path, out_dir, **sections):
    raw = {
        "name": "t",
        "input": {"path": input_path},
        "output": {"dir": str(out_dir), "report": False},
        "triggers": {"enabled": False},
        "dedup": {"phash": {"enabled": False}},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return parse_config(raw)


def _manifest(out_dir):
    return read_table(os.path.join(out_dir, "manifest")).to_pylist()


def test_flickr_shards_553_keys(flickr_shards, tmp_path):
    out = tmp_path / "out"
    info = run_job(_cfg(flickr_shards, out))
    rows = _manifest(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == 553 and len(set(keys)) == 553
    assert info["summary"]["keys"] == 553
    assert info["summary"]["failures_by_type"] == {"failed_to_download": 3}
    run = json.loads((out / "run.json").read_text())
    RunSummary.model_validate(run)
    assert run["outputs"]["manifest"] == 553
    assert run["counters"]["decode"]["decoded"] == 550
    assert sum(r["status"] == "failed" for r in rows) == 3


def _bad_shard(tmp_path, odd_dir=None):
    import io

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, format="PNG")
    good = [sample(f"0000{i:04d}", caption=f"a good photo number {i}") for i in range(5)]
    bad = [
        sample("00010001", image=jpeg_bytes(7)[:400]),  # corrupt JPEG
        sample("00010002", caption=None),  # missing caption
        sample("00010003", caption=b"caf\xe9 au lait"),  # non-UTF-8
        sample("00010004", image=jpeg_bytes(8), ext="png"),  # JPEG bytes under .png
        sample("00010005", caption="x" * 1_000_000),  # 1 MB caption
        sample("00010006", image=bomb.getvalue(), ext="png"),  # decompression bomb
    ]
    odd = []
    if odd_dir is not None:
        for i, path in enumerate(sorted(p for p in odd_dir.rglob("*") if p.is_file())):
            ext = path.suffix.lstrip(".").lower()
            odd.append(sample(f"0002{i:04d}", image=path.read_bytes(), ext=ext, caption=f"odd file {path.name}"))
    shard = write_shard(str(tmp_path / "00000.tar"), good + bad + odd)
    return shard, {k for k, _ in good + bad + odd}


def test_bad_input_lands_in_failures(tmp_path, shared_data):
    src = tmp_path / "in"
    src.mkdir()
    shard, keys = _bad_shard(src, shared_data / "odd-images")
    # a truncated copy of a real shard beside it
    real = shared_data / "flickr8k-dev" / "img2dataset-256" / "00002.tar"
    data = real.read_bytes()
    (src / "00009.tar").write_bytes(data[: len(data) // 2])
    shutil.copy(real.with_suffix(".parquet"), src / "00009.parquet")
    real_keys = set(pq.read_table(real.with_suffix(".parquet")).column("key").to_pylist())
    out = tmp_path / "out"
    info = run_job(_cfg(str(src / "*.tar"), out))
    rows = {r["key"]: r for r in _manifest(out)}
    assert set(rows) == keys | real_keys  # nothing lost
    fails = {r["key"]: r["error_type"] for r in read_table(str(out / "failures")).to_pylist()}
    expect = {
        "00010001": "corrupt_image",
        "00010002": "missing_caption",
        "00010003": "bad_caption_encoding",
        "00010005": "caption_too_long",
        "00010006": "decompression_bomb",
    }
    for key, error_type in expect.items():
        assert fails[key] == error_type
        assert rows[key]["status"] == "failed" and rows[key]["decision"] == "drop"
    assert rows["00010004"]["status"] == "ok" and "00010004" not in fails  # JPEG bytes under .png: kept
    assert "truncated_tar" in fails.values()
    odd_failed = {k: v for k, v in fails.items() if k.startswith("0002")}
    # odd formats under wrong names (JPEG bytes named .bmp, .png, even .svg) are decoded by content
    assert sorted(odd_failed.values()) == ["unidentified_image"]
    assert info["summary"]["ok"] == sum(r["status"] == "ok" for r in rows.values())


def test_exact_duplicates_cluster_one_kept(tmp_path):
    img = jpeg_bytes(3)
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.open(io.BytesIO(img)).save(png, format="PNG")  # same pixels, other bytes
    shard = write_shard(
        str(tmp_path / "00000.tar"),
        [
            sample("a1", image=img),
            sample("a2", image=img),
            sample("a3", image=png.getvalue(), ext="png"),
            sample("b1", image=jpeg_bytes(4)),
        ],
    )
    out = tmp_path / "out"
    run_job(_cfg(shard, out, dedup={"keeper": "earliest"}))
    rows = {r["key"]: r for r in _manifest(out)}
    assert {rows[k]["cluster_id"] for k in ("a1", "a2", "a3")} == {"a1"}
    assert [rows[k]["decision"] for k in ("a1", "a2", "a3", "b1")] == ["keep", "drop", "drop", "keep"]
    assert rows["a3"]["reasons"] == ["duplicate:pixels"]
    assert rows["b1"]["cluster_size"] == 1


def test_failure_ratio_cap(tmp_path):
    shard = write_shard(str(tmp_path / "00000.tar"), [sample(f"k{i}", caption=None) for i in range(4)])
    from pipeline.job import RunFailed

    with pytest.raises(RunFailed, match="max_failure_ratio"):
        run_job(_cfg(shard, tmp_path / "out"))


def test_demo_job(demo_data, tmp_path):
    out = tmp_path / "demo"
    run_job(_cfg(str(demo_data / "shards" / "*.tar"), out))
    truth = {r["key"]: r for r in pq.read_table(demo_data / "truth.parquet").to_pylist()}
    rows = {r["key"]: r for r in _manifest(out)}
    assert set(rows) == set(truth)
    exact = [k for k, t in truth.items() if t["variant"] == "exact_dup"]
    assert all(rows[k]["cluster_size"] >= 3 for k in exact)


def test_clip_stage_in_the_pipeline(demo_data, tmp_path):
    """The CLIP embedder (a tiny random-weight open_clip architecture) wired end to end: vectors
    persisted per shard, semantic edges and neighbours per sample, every key still in the manifest."""
    model = tmp_path / "memsieve-tiny-clip.json"
    model.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    out = tmp_path / "out"
    cfg = _cfg(
        str(demo_data / "shards" / "*.tar"),
        out,
        dedup={
            "clip": {
                "enabled": True,
                "model": str(model),
                "threshold": 0.999,
                "batch_size": 8,
                "allow_random_weights": True,
            }
        },
    )
    info = run_job(cfg)
    assert len(_manifest(out)) == 104
    neighbours = read_table(str(out / "neighbours")).to_pylist()
    decoded = info["counters"]["decode"]["decoded"]
    assert decoded == 97 and sum(n["embedder"] == "clip" for n in neighbours) == decoded  # every decoded sample
    saved = list((out / "embeddings").rglob("*.npy"))
    assert len(saved) == 3  # one file per shard
