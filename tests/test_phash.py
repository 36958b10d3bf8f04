import io
import itertools
import os

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageEnhance

from pipeline.config import PhashConfig, parse_config
from pipeline.job import run_job
from transforms.phash import BITS, CROPS, FindPhashCopies, compute_hashes, find_copy_pairs, hamming_threshold
from transforms.write import read_table


def _photo(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = (rng.random((12, 16, 3)) * 255).astype("uint8")
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _jpeg(img, q):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _dist(a, b) -> int:
    bits_a, bits_b = np.unpackbits(compute_hashes(a), axis=1), np.unpackbits(compute_hashes(b), axis=1)
    return min(int((x != y).sum()) for x, y in itertools.product(bits_a, bits_b))


def test_hash_shape():
    assert compute_hashes(_photo(0)).shape == (len(CROPS), BITS // 8)


def test_copies_close_others_far():
    limit = hamming_threshold(PhashConfig().max_hamming)
    img = _photo(1)
    w, h = img.size
    copies = [
        _jpeg(img, 25),
        img.resize((w // 3, h // 3)),
        img.crop((int(w * 0.05), int(h * 0.05), int(w * 0.95), int(h * 0.95))),
        ImageEnhance.Brightness(img).enhance(1.3),
    ]
    for copy in copies:
        assert _dist(img, copy) <= limit
    for seed in range(2, 8):
        assert _dist(img, _photo(seed)) > limit


def test_find_copy_pairs_on_literal_codes():
    codes = np.zeros((3, len(CROPS), BITS // 8), dtype=np.uint8)
    codes[1, :, 0] = 0b00000111  # 3 bits from the first, in every crop
    codes[2] = 255  # far from both
    edges, neighbours = find_copy_pairs(["a", "b", "c"], codes, max_bits=4)
    assert [(e.key_a, e.key_b, round(e.similarity, 4)) for e in edges] == [("a", "b", round(1 - 3 / BITS, 4))]
    assert {(n.key, n.nn_key) for n in neighbours} == {("a", "b"), ("b", "a")}


def test_transform_on_pipeline():
    imgs = {"k1": _photo(3), "k2": _jpeg(_photo(3), 30), "k3": _photo(4)}
    items = [(k, compute_hashes(v).tobytes()) for k, v in imgs.items()]
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(items) | FindPhashCopies(PhashConfig())
        assert_that(out["edges"] | beam.Map(lambda e: (e.key_a, e.key_b)), equal_to([("k1", "k2")]))


def test_flickr_compressed_dups_precision_recall(flickr_shards, tmp_path):
    """Acceptance: each compressed_dup clusters with its original, and nothing else merges."""
    out = tmp_path / "out"
    cfg = parse_config({"name": "t", "input": {"path": flickr_shards}, "output": {"dir": str(out), "report": False}})
    run_job(cfg)
    rows = read_table(str(out / "manifest")).to_pylist()
    flickr_file = {}
    for shard in sorted(os.listdir(os.path.dirname(flickr_shards))):
        if shard.endswith(".parquet"):
            for r in read_table(os.path.join(os.path.dirname(flickr_shards), shard)).to_pylist():
                if r["status"] == "success":
                    flickr_file[r["key"]] = r["flickr_file"]
    ok = [r for r in rows if r["status"] == "ok"]
    by_cluster, by_file = {}, {}
    for r in ok:
        by_cluster.setdefault(r["cluster_id"], set()).add(r["key"])
        by_file.setdefault(flickr_file[r["key"]], set()).add(r["key"])

    def pairs(groups):
        return {tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(g, 2)}

    found, truth = pairs(by_cluster), pairs(by_file)
    assert len(truth) == 50
    assert found == truth  # pair precision and recall 1.0
    in_pairs = [r for r in ok if r["cluster_size"] == 2]
    assert len(in_pairs) == 100
    assert {r["duplication"] for r in in_pairs} == {"partial"}  # their captions differ
