"""scripts/make_hard_copyset.py and scripts/copy_edits.py: every kind of edit, decoys, bursts, shards."""

import json
import os
import random
import sys
import tarfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import copy_edits  # noqa: E402
import make_hard_copyset  # noqa: E402


def _photos(folder, n):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        img = Image.fromarray((rng.random((30, 40, 3)) * 255).astype("uint8")).resize((400, 300))
        img.save(os.path.join(folder, f"p{i:03d}.jpg"))


def test_edits_change_the_image_and_keep_it_rgb():
    img = Image.open(_photos_one()).convert("RGB")
    for name, fn in copy_edits.EDITS.items():
        out, params = fn(img, random.Random(name))
        assert out.mode == "RGB" and isinstance(params, dict), name
        assert out.size != img.size or np.abs(np.asarray(out, int) - np.asarray(img, int)).mean() > 1, name
    w, h = copy_edits._largest_inner(400, 300, np.radians(8))
    assert 0 < w < 400 and 0 < h < 300


def _photos_one():
    import tempfile

    folder = tempfile.mkdtemp()
    _photos(folder, 1)
    return os.path.join(folder, "p000.jpg")


def test_template_decoy_reuses_the_template():
    img = Image.open(_photos_one()).convert("RGB")
    other = img.transpose(Image.Transpose.ROTATE_180)
    for fn in (copy_edits.meme, copy_edits.screenshot):
        a, tpl = fn(img, random.Random(1))
        b, tpl_b = fn(other, random.Random(2), tpl=tpl)
        assert tpl_b == tpl and a.size == b.size


def test_build_writes_every_kind_decoys_bursts_and_shards(tmp_path):
    _photos(str(tmp_path / "src"), 12)
    rows = make_hard_copyset.build(str(tmp_path / "src"), str(tmp_path / "out"), 3, 2, 2, seed=0)
    kinds = {r["transform"] for r in rows}
    assert set(make_hard_copyset.KINDS) | {"original", "burst"} <= kinds
    assert sum(r["transform"].startswith("decoy") for r in rows) == 2
    bursts = [r for r in rows if r["transform"] == "burst"]
    assert len(bursts) == 4 and len({r["source"] for r in bursts}) == 4  # two shots, neither a copy
    burst_photos = {r["source"].split("#")[0] for r in bursts}
    assert not any(r["transform"] == "original" and r["source"] in burst_photos for r in rows)
    assert all(os.path.isfile(tmp_path / "out" / "images" / r["file"]) for r in rows)
    assert {r["split"] for r in rows} <= {"tune", "test"}
    n = make_hard_copyset.write_shards(rows, str(tmp_path / "out"), {}, per_shard=20)
    names = []
    for i in range(n):
        with tarfile.open(tmp_path / "out" / "shards" / f"{i:05d}.tar") as tar:
            names += tar.getnames()
    assert len(names) == 3 * len(rows)
    meta = [json.loads(line) for line in open(tmp_path / "out" / "manifest.jsonl")]
    assert len(meta) == len(rows)
