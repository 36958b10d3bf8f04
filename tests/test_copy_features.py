"""The ORB copy stage (transforms/local_features.py, orb_stage.py) and the SSCD embedder: fast checks."""

import hashlib
import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.config import ClusterConfig, ConfigError, OrbConfig, SscdConfig, parse_config
from schemas.elements import Edge, Sample
from transforms.decode import DecodeError, decode_image
from transforms.local_features import Alignment, Features, align, extract_features, verify, vocabulary, words
from transforms.orb_stage import FindOrbCopies, find_orb_pairs

CFG = OrbConfig(enabled=True)


def _photo(seed: int, size=(480, 360)) -> Image.Image:
    """A photo-like image: smooth colour fields plus shapes (corners for FAST) and fine texture."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((9, 12, 3)) * 255).astype("uint8")).resize(size, Image.BICUBIC)
    d = ImageDraw.Draw(base)
    for _ in range(40):
        x, y = rng.integers(0, size[0] - 40), rng.integers(0, size[1] - 40)
        w, h = rng.integers(8, 60, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.rectangle if rng.random() < 0.5 else d.ellipse)((x, y, x + w, y + h), fill=fill)
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype("uint8"))


def _meme(img, text=("TOP TEXT HERE", "BOTTOM TEXT")):
    bar = img.height // 5
    out = Image.new("RGB", (img.width, img.height + 2 * bar), "white")
    out.paste(img, (0, bar))
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=bar // 2)
    d.text((img.width // 2, bar // 2), text[0], fill="black", font=font, anchor="mm")
    d.text((img.width // 2, img.height + bar + bar // 2), text[1], fill="black", font=font, anchor="mm")
    return out


def _crop(img, box):
    return img.crop(box)


def _feat(img):
    return extract_features(img, CFG)


def test_features_round_trip_and_words():
    f = _feat(_photo(1))
    g = Features.from_bytes(f.to_bytes())
    assert len(f.xy) > 100 and np.array_equal(f.desc, g.desc) and np.allclose(f.xy, g.xy) and g.size == f.size
    w = words(f.desc, CFG.tables, CFG.word_bits)
    assert w.shape == (len(f.desc), CFG.tables) and len(np.unique(w >> 40)) == CFG.tables
    assert np.array_equal(w, words(g.desc, CFG.tables, CFG.word_bits))  # seeded: the same on every worker


@pytest.mark.parametrize(
    "edit",
    [
        lambda im: _crop(im, (130, 20, 450, 300)),  # ~52% of the area, off centre
        lambda im: im.rotate(7, Image.BICUBIC, expand=True),
        _meme,
        lambda im: ImageOps.expand(im.resize((300, 225)), (60, 200), fill=(240, 240, 240)),
    ],
    ids=["crop_anywhere", "rotate7_expanded", "meme", "inside_a_frame"],
)
def test_copies_verify(edit):
    img = _photo(2)
    v = verify(_feat(img), _feat(edit(img)), CFG)
    assert v.copy, v


def test_burst_shots_and_template_mates_do_not_verify():
    img = _photo(3, (640, 360))
    left, right = img.crop((0, 0, 400, 360)), img.crop((240, 0, 640, 360))  # overlap 40% of each
    assert not verify(_feat(left), _feat(right), CFG).copy
    a, b = _meme(_photo(4)), _meme(_photo(5))  # two photos in one meme template
    assert not verify(_feat(a), _feat(b), CFG).copy
    assert not verify(_feat(_photo(6)), _feat(_photo(7)), CFG).copy


def test_wide_burst_shots_stay_apart_and_a_crop_of_the_same_size_links():
    """Two shots panned across one scene overlapping 86% pass the overlap and photometric checks
    (the same pixels); each shows a strip the other lacks, so neither lies inside the other."""
    img = _photo(3, (640, 360))
    left, right = _feat(img.crop((0, 0, 560, 360))), _feat(img.crop((80, 0, 640, 360)))
    v = verify(left, right, CFG)
    assert v.overlap >= CFG.min_overlap and v.agreement >= CFG.min_agreement  # only containment tells
    assert not v.copy and v.contained < CFG.min_contained, v
    crop = verify(_feat(img), right, CFG)  # the same shot against the whole scene: a crop
    assert crop.copy and crop.contained >= 0.97, crop


def test_real_burst_shots_stay_apart(flickr_shards):
    """Flickr 1295671216 / 1295698260: two shots of one crowd a moment apart (83% overlap,
    agreement ~0.6), the one extra pair the demo job once linked on the Flickr shards."""
    import glob
    import tarfile

    imgs = {}
    for shard in sorted(glob.glob(flickr_shards)):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name in ("00000192.jpg", "00001066.jpg"):
                    imgs[m.name[:8]] = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
    a, b = _feat(imgs["00000192"]), _feat(imgs["00001066"])
    v = verify(a, b, CFG)
    assert not v.copy and v.contained < CFG.min_contained, v
    w, h = imgs["00000192"].size
    assert verify(a, _feat(imgs["00000192"].crop((w // 8, h // 10, w, h))), CFG).copy  # its crop still links


def test_vocabulary_grows_with_the_collection():
    assert vocabulary(CFG, 2_000) == vocabulary(CFG, CFG.vocabulary_images) == (CFG.tables, CFG.word_bits)
    tables, bits = vocabulary(CFG, 10**8)  # 1e8 / 1e5 = 2^9.97: ten more bits, ~20 tables
    assert bits == CFG.word_bits + 10 and 16 <= tables <= 24
    assert vocabulary(CFG, 10**7)[1] < bits and vocabulary(CFG.model_copy(update={"vocabulary_images": 0}), 10**8) == (
        CFG.tables,
        CFG.word_bits,
    )
    assert vocabulary(CFG, 10**12)[1] == 40  # the word id keeps its table index above bit 40


def test_alignment_round_trip():
    img = _photo(2)
    al = align(_feat(img), _feat(img.rotate(5, Image.BICUBIC)), CFG)
    back = Alignment.from_bytes(al.to_bytes())
    assert np.allclose(back.m, al.m) and np.array_equal(back.src, al.src) and np.array_equal(back.dst, al.dst)
    assert back.overlap == al.overlap and len(al.src) >= CFG.min_inliers


def test_dark_photos_under_one_caption_do_not_verify():
    """Two dark photos under the same meme caption match on its letters (hundreds of inliers, the
    photos' few textured cells outvoted): the photometric check leaves out the inliers' cells."""
    text = ("ONE DOES NOT SIMPLY", "WALK INTO MONDAY")
    dark = lambda seed: _photo(seed).point(lambda v: int(v * 0.25))  # noqa: E731
    assert not verify(_feat(_meme(dark(4), text)), _feat(_meme(dark(5), text)), CFG).copy
    assert verify(_feat(dark(2)), _feat(_meme(dark(2), text)), CFG).copy


def test_find_orb_pairs_links_copies_only():
    imgs = {"a": _photo(8), "b": _crop(_photo(8), (60, 40, 420, 330)), "c": _photo(9), "d": _meme(_photo(9))}
    imgs["e"] = _photo(10)
    edges = find_orb_pairs({k: _feat(v) for k, v in imgs.items()}, CFG)
    assert sorted((e.key_a, e.key_b) for e in edges) == [("a", "b"), ("c", "d")]
    assert all(e.embedder == "orb" and 0 < e.similarity <= 1 for e in edges)


def _sample(key, img, ext="jpg"):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    data = buf.getvalue() if ext == "jpg" else b"not an image"
    return Sample(key, "s0", "", "", "{}", data, ext, hashlib.sha256(data).hexdigest())


def test_orb_on_pipeline():
    samples = [
        _sample("k1", _photo(11)),
        _sample("k2", _photo(11).rotate(5, Image.BICUBIC)),
        _sample("k3", _photo(12)),
        _sample("k4", _photo(14, (640, 360)).crop((0, 0, 560, 360))),  # two wide burst shots: apart
        _sample("k5", _photo(14, (640, 360)).crop((80, 0, 640, 360))),
        _sample("bad", _photo(13), ext="png"),
    ]
    feats = []
    for smp in samples:
        try:
            feats.append((smp.key, _feat(decode_image(smp.image, smp.image_ext, 10**8)).to_bytes()))
        except DecodeError:
            pass  # ProcessShards reports it; no features
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(feats) | FindOrbCopies(CFG)
        assert_that(out["edges"] | beam.Map(lambda e: (e.key_a, e.key_b, e.embedder)), equal_to([("k1", "k2", "orb")]))
        assert_that(
            out["neighbours"] | beam.Map(lambda n: (n.key, n.nn_key)),
            equal_to([("k1", "k2"), ("k2", "k1")]),
            label="nn",
        )


def test_beam_stage_equals_in_memory_with_stop_words():
    """Four photos in one meme template plus copies, max_df 2: the template's words are
    stop-words, which reach verification keyed per image (not a side input); same edges."""
    imgs = {f"m{i}": _meme(_photo(20 + i)) for i in range(4)}
    imgs["c0"] = _crop(_photo(20), (60, 40, 420, 330))
    imgs["c1"] = _photo(21).rotate(4, Image.BICUBIC)
    feats = {k: _feat(v) for k, v in imgs.items()}
    cfg = CFG.model_copy(update={"max_df": 2})
    expected = sorted((e.key_a, e.key_b) for e in find_orb_pairs(feats, cfg))
    assert ("c0", "m0") in expected and ("c1", "m1") in expected
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create([(k, f.to_bytes()) for k, f in feats.items()]) | FindOrbCopies(cfg)
        assert_that(out["edges"] | beam.Map(lambda e: (e.key_a, e.key_b)), equal_to(expected))


@pytest.mark.parametrize("hash_matched,linked", [([("k1", "k2")], []), ([("k1", "k9")], [("k1", "k2")])])
def test_only_unmatched_skips_pairs_the_hash_matched(hash_matched, linked):
    """only_unmatched: a pair is verified only when the hash left one of its images unmatched."""
    img = _photo(11)
    feats = [("k1", _feat(img).to_bytes()), ("k2", _feat(img.rotate(5, Image.BICUBIC)).to_bytes())]
    cfg = CFG.model_copy(update={"only_unmatched": True})
    with TestPipeline(runner="DirectRunner") as p:
        hashed = p | "Hash" >> beam.Create([Edge(a, b, 1.0, "phash") for a, b in hash_matched])
        out = p | beam.Create(feats) | FindOrbCopies(cfg, hashed)
        assert_that(out["edges"] | beam.Map(lambda e: (e.key_a, e.key_b)), equal_to(linked))


def test_sscd_config_needs_weights():
    with pytest.raises(ConfigError, match="dedup.sscd"):
        parse_config({"name": "t", "input": {"path": "x"}, "dedup": {"sscd": {"enabled": True}}})


def test_sscd_random_torchscript_model(tmp_path):
    """A randomly initialised TorchScript model of SSCD's output shape (512): preprocessing,
    normalisation and copy edges run end to end. No claim on quality."""
    torch = pytest.importorskip("torch")
    from transforms.embed_sscd import SscdCopies, embed, load_model, preprocess

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 512),
    )
    path = str(tmp_path / "sscd_random.torchscript.pt")
    torch.jit.script(net).save(path)
    cfg = SscdConfig(enabled=True, weights=path, size=64, batch_size=4)
    x = preprocess(_photo(14), cfg.size)
    assert x.shape == (3, 64, 85) and abs(float(x.mean())) < 3
    model, device = load_model(path, "cpu")
    v = embed(model, device, [x, preprocess(_photo(15), cfg.size)])
    assert v.shape == (2, 512) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    samples = [_sample("a", _photo(16)), _sample("b", _photo(16))]  # the same photo twice: cosine 1
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(samples) | SscdCopies(cfg, ClusterConfig())
        assert_that(out["edges"] | beam.Map(lambda e: (e.key_a, e.key_b, e.embedder)), equal_to([("a", "b", "sscd")]))
    with pytest.raises(ValueError, match="dedup.sscd.weights"):
        load_model(str(tmp_path / "missing.pt"))
