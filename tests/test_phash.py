import io
import itertools
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from pipeline.config import PhashConfig, parse_config
from pipeline.job import run_job
from transforms.phash import (
    BITS,
    CODE_BYTES,
    CROPS,
    N_HASHES,
    QUERY_ROWS,
    TEMPLATE_BOX,
    FindPhashCopies,
    compute_hashes,
    content_box,
    find_copy_pairs,
    hamming_threshold,
    stack_codes,
    trim_box,
)
from transforms.write import read_table

LIMIT = hamming_threshold(PhashConfig().max_hamming)


def _photo(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = (rng.random((12, 16, 3)) * 255).astype("uint8")
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _jpeg(img, q):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img, keep_w, keep_h):
    w, h = img.size
    cw, ch = round(w * keep_w), round(h * keep_h)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _watermark(img):
    out = img.copy()
    ImageDraw.Draw(out).text((8, img.height - 20), "(c) stockfoto", fill=(255, 255, 255))
    return out


def _pad(img, fill, dx: int, dy: int):
    """img on a canvas dx/dy larger each side: a fill colour, or (None) a blurred stretch of itself."""
    size = (img.width + 2 * dx, img.height + 2 * dy)
    canvas = Image.new("RGB", size, fill) if fill else img.resize(size).filter(ImageFilter.GaussianBlur(12))
    canvas.paste(img, (dx, dy))
    return canvas


def _template(photo):
    """A chat-app-like screenshot: flat chrome, a header, text lines, the photo in a bubble."""
    out = Image.new("RGB", (420, 820), (236, 229, 221))
    d = ImageDraw.Draw(out)
    d.rectangle((0, 0, 420, 64), fill=(7, 94, 84))
    for y in range(90, 140, 16):
        d.rectangle((20, y, 250, y + 7), fill=(120, 120, 120))
    out.paste(photo.resize((300, 225)), (100, 160))
    d.rounded_rectangle((14, 740, 406, 790), 20, fill=(255, 255, 255))
    return out


def _dist(original, copy) -> int:
    """The detector's distance: the copy's full frame vs. any of the original's crops, both ways."""
    a, b = np.unpackbits(compute_hashes(original), axis=1), np.unpackbits(compute_hashes(copy), axis=1)
    pairs = [(a[q], y) for q in QUERY_ROWS for y in b] + [(x, b[q]) for q in QUERY_ROWS for x in a]
    return min(int((x != y).sum()) for x, y in pairs)


def test_hash_shape_and_balance():
    codes = compute_hashes(_photo(0))
    assert codes.shape == (N_HASHES, CODE_BYTES) and codes.dtype == np.uint8
    assert (np.unpackbits(codes, axis=1).sum(axis=1) <= BITS // 2).all()  # median split: about half set


@pytest.mark.parametrize(
    "make",
    [
        lambda im: _jpeg(im, 25),
        lambda im: im.resize((im.width // 3, im.height // 3)),
        lambda im: _crop(im, 0.85, 0.85),
        lambda im: _crop(im, 0.93, 0.87),
        lambda im: _jpeg(_crop(im, 0.88, 0.88).resize((150, 100)), 30),
        lambda im: ImageEnhance.Brightness(im).enhance(1.3),
        lambda im: im.point(lambda v: max(0, v - 40)),
        _watermark,
        ImageOps.mirror,
        lambda im: _pad(im, (0, 0, 0), 0, 60),
        lambda im: _pad(im, (255, 255, 255), 30, 20),
    ],
    ids=[
        "jpeg25",
        "downscale",
        "crop85",
        "crop93x87",
        "crop+down+jpeg",
        "brighter",
        "darker",
        "watermark",
        "flip",
        "letterbox",
        "white_border",
    ],
)
def test_copy_within_threshold(make):
    img = _photo(1)
    assert _dist(img, make(img)) <= LIMIT


def test_other_images_beyond_threshold():
    img = _photo(1)
    for seed in range(2, 10):
        assert _dist(img, _photo(seed)) > LIMIT


def test_template_mates_apart_and_photo_found_in_its_template():
    """Two photos in one screenshot template hash apart (the template's flat chrome is not hashed),
    while the photo itself still finds the screenshot it sits in."""
    a, b = _photo(1), _photo(2)
    assert _dist(_template(a), _template(b)) > LIMIT
    assert _dist(a, _template(a)) <= LIMIT


def test_darkened_copy_clipped_to_black_still_meets_its_original():
    """A night photo darkened until its sky clips to flat black looks like a template to the
    content-box test (a small box of detail); its whole frame must still be there for the
    original's full-frame query (the copy holdout's brightness copies)."""
    a = np.asarray(_photo(1, (400, 300))).astype(np.float32)
    a[:, :240] = a[:, :240] * 0.12 + 8  # a dim sky with faint texture
    night = Image.fromarray(a.astype("uint8"))
    copy = night.point(lambda v: max(0, v - 40))
    gray = copy.convert("L")
    box = content_box(gray.crop(trim_box(gray)))
    assert box is not None and (box[2] - box[0]) * (box[3] - box[1]) < TEMPLATE_BOX * gray.width * gray.height
    assert content_box(night.convert("L")) is None
    assert _dist(night, copy) <= LIMIT


def test_trim_box_finds_the_photo_inside_borders():
    rng = np.random.default_rng(5)  # a photo with fine detail, which a blurred pad lacks
    img = Image.fromarray((rng.random((60, 80, 3)) * 255).astype("uint8")).resize((320, 240), Image.BICUBIC)
    for padded in (_pad(img, (0, 0, 0), 0, 60), _pad(img, None, 80, 0), _pad(img, (250, 250, 250), 30, 20)):
        left, top, right, bottom = trim_box(padded.convert("L"))
        assert abs(right - left - img.width) <= 6 and abs(bottom - top - img.height) <= 6
        assert _dist(img, padded) <= LIMIT
    assert trim_box(img.convert("L")) == (0, 0, *img.size)  # nothing to trim


def test_find_copy_pairs_on_literal_codes():
    codes = np.zeros((3, N_HASHES, CODE_BYTES), dtype=np.uint8)
    codes[1, :, 0] = 0b00000111  # 3 bits from the first, in every crop
    codes[2] = 255  # far from both
    edges, neighbours = find_copy_pairs(["a", "b", "c"], codes, max_bits=4)
    assert [(e.key_a, e.key_b, e.similarity, e.embedder) for e in edges] == [("a", "b", 1 - 3 / BITS, "phash")]
    # every key gets its nearest neighbour, even beyond the threshold (ties -> the smaller key)
    assert [(n.key, n.nn_key, n.nn_similarity) for n in neighbours] == [
        ("a", "b", 1 - 3 / BITS),
        ("b", "a", 1 - 3 / BITS),
        ("c", "b", 1 - (BITS - 3) / BITS),
    ]


def test_threshold_is_inclusive_and_crop_codes_count():
    codes = np.zeros((2, N_HASHES, CODE_BYTES), dtype=np.uint8)  # other codes all equal (never compared)
    codes[0, list(QUERY_ROWS)] = 255  # a's query rows are far from all of b's codes
    codes[1, list(QUERY_ROWS), 0] = 0b00011111  # b's query rows are 5 bits from a's other codes
    edges, _ = find_copy_pairs(["a", "b"], codes, max_bits=5)
    assert [(e.key_a, e.key_b, e.similarity) for e in edges] == [("a", "b", 1 - 5 / BITS)]
    assert find_copy_pairs(["a", "b"], codes, max_bits=4)[0] == []


def test_partitioned_path_finds_the_same_pairs():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (300, N_HASHES, CODE_BYTES), dtype=np.uint8)
    copies = base.copy()
    copies[:, :, 0] ^= 0b00000011  # 2 bits off in every code
    codes = np.concatenate([base, copies])
    keys = [f"k{i:04d}" for i in range(len(codes))]
    exact, nn_exact = find_copy_pairs(keys, codes, max_bits=8)
    cells, nn_cells = find_copy_pairs(keys, codes, max_bits=8, n_cells=12)
    assert len(exact) == 300 and set(exact) == set(cells)
    assert nn_exact == nn_cells  # every copy is its original's nearest, and they share a cell


def test_stack_codes_skips_bad_sizes_and_repeated_keys():
    good = bytes(N_HASHES * CODE_BYTES)
    keys, codes = stack_codes([("b", good), ("a", good), ("a", good), ("c", b"\x00"), ("d", b"")])
    assert keys == ["a", "b"] and codes.shape == (2, N_HASHES, CODE_BYTES)


def test_stack_codes_pads_fewer_hashes_with_the_full_frame():
    longer = np.arange(len(CROPS) * CODE_BYTES + CODE_BYTES, dtype=np.uint8) % 251
    shorter = np.full(CODE_BYTES, 7, dtype=np.uint8)
    keys, codes = stack_codes([("a", longer.tobytes()), ("b", shorter.tobytes())])
    assert codes.shape == (2, len(CROPS) + 1, CODE_BYTES)
    assert (codes[1] == 7).all() and (codes[0].ravel() == longer).all()


def test_query_rows_extend_the_comparison(monkeypatch):
    """A hash row outside QUERY_ROWS is only a target; listed in QUERY_ROWS it also queries."""
    from transforms import phash

    codes = np.zeros((2, 2, CODE_BYTES), dtype=np.uint8)
    codes[0, 0] = 0xFF  # a: full frame all ones, second hash all zeros
    codes[1, 0] = 0x0F  # b: full frame 128 bits from both of a's hashes
    codes[1, 1, 0] = 0b1  # b's second hash: 1 bit from a's second hash, 255 from a's full frame
    monkeypatch.setattr(phash, "QUERY_ROWS", (0,), raising=False)
    assert phash.find_copy_pairs(["a", "b"], codes, max_bits=4)[0] == []
    monkeypatch.setattr(phash, "QUERY_ROWS", (0, 1), raising=False)
    edges, _ = phash.find_copy_pairs(["a", "b"], codes, max_bits=4)
    assert [(e.key_a, e.key_b) for e in edges] == [("a", "b")]


def test_transform_on_pipeline():
    imgs = {"k1": _photo(3), "k2": _jpeg(_crop(_photo(3), 0.9, 0.9), 30), "k3": _photo(4)}
    items = [(k, compute_hashes(v).tobytes()) for k, v in imgs.items()]
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(items) | FindPhashCopies(PhashConfig())
        assert_that(out["edges"] | beam.Map(lambda e: (e.key_a, e.key_b)), equal_to([("k1", "k2")]))
        nn = out["neighbours"] | beam.Map(lambda n: (n.key, n.nn_key if n.key != "k3" else "k1|k2"))
        assert_that(nn, equal_to([("k1", "k2"), ("k2", "k1"), ("k3", "k1|k2")]), label="nn")


def _flickr_truth(shard_dir: str) -> dict[str, str]:
    flickr_file = {}
    for shard in sorted(os.listdir(shard_dir)):
        if shard.endswith(".parquet"):
            for r in read_table(os.path.join(shard_dir, shard)).to_pylist():
                if r["status"] == "success":
                    flickr_file[r["key"]] = r["flickr_file"]
    return flickr_file


@pytest.mark.parametrize("orb", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["hash", "hash+orb"])
def test_flickr_compressed_dups_precision_recall(flickr_shards, tmp_path, orb):
    """Acceptance 1: each compressed_dup clusters with its original, and nothing else merges;
    with the ORB stage too (two burst shots of one crowd, 00000192 / 00001066, stay apart)."""
    out = tmp_path / "out"
    raw = {"name": "t", "input": {"path": flickr_shards}, "output": {"dir": str(out), "report": False}}
    run_job(parse_config({**raw, "triggers": {"enabled": False}, "dedup": {"orb": {"enabled": orb}}}))
    rows = read_table(str(out / "manifest")).to_pylist()
    flickr_file = _flickr_truth(os.path.dirname(flickr_shards))
    by_cluster, by_file = {}, {}
    for r in (r for r in rows if r["status"] == "ok"):
        by_cluster.setdefault(r["cluster_id"], set()).add(r["key"])
        by_file.setdefault(flickr_file[r["key"]], set()).add(r["key"])

    def pairs(groups):
        return {tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(g, 2)}

    found, truth = pairs(by_cluster), pairs(by_file)
    assert len(truth) == 50
    assert found == truth  # pair precision and recall 1.0


def test_sample_rows_merges_pieces_lazily_and_order_free():
    """The cell search's sample (many small code batches, merged only past 2x cap) is the cap rows
    of smallest key priority, whatever the batches' order and the accumulators' split."""
    from transforms import cell_search
    from transforms.ann_edges import SampleRows

    rng = np.random.default_rng(3)
    keys = np.array([f"k{i:05d}" for i in range(700)])
    codes = rng.integers(0, 256, (700, N_HASHES, CODE_BYTES), dtype=np.uint8)
    batches = [(keys[s : s + 9], codes[s : s + 9]) for s in range(0, 700, 9)]
    want = codes[cell_search.sample_rows(keys, 50, 0)]
    fn = SampleRows(50, 0)
    for order in (batches, batches[::-1]):
        accs = [fn.create_accumulator(), fn.create_accumulator()]
        for n, batch in enumerate(order):
            accs[n % 2] = fn.add_input(accs[n % 2], batch)
        n_rows, sample = fn.extract_output(fn.merge_accumulators(accs))
        assert n_rows == 700 and np.array_equal(sample, want)
