"""The harder memorization lab set: webdataset shards made from the demo images (pip-shipped).

    python scripts/make_lab_set.py out/lab-set [--seed 0] [--singles 360] [--per-count 6]

What real web data has, planted with known truth (``truth.json``):
- images repeated 1, 2, 4, 8, 16 and 32 times; a quarter of the copies byte-identical (exact dedup
  finds those), the rest recompressed, resized, cropped or flipped (only a near-duplicate search
  finds them; a flipped copy is a mirror image, which the DCT hash does not match);
- per repeated image a kind: ``full`` (one caption on every copy), ``template`` (many captions
  sharing a template: "{subject} for sale - {w} {w} print"), ``trigger`` (a planted keyword on
  most copies' captions, the rest varied) or ``partial`` (varied captions);
- the same caption on different images (``same_caption``), and an object trigger: the keyword
  "heritage" on different images whose metadata ``objects`` hold "flag" and whose captions never
  say so (``object_trigger``);
- held-out images and captions (never in the shards) for the quality proxy, the replication
  threshold and the probe's in-domain negatives (``heldout.npz``, ``truth.json``).
Singletons are random crops (rotated, channel-permuted) of the demo images, 96x96 JPEG.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.demo_data import STYLES, SUBJECTS, base_images, write_shards  # noqa: E402
from pipeline.lab import NOUNS, WORDS  # noqa: E402

COUNTS = (2, 4, 8, 16, 32)
KINDS = ("full", "template", "full", "trigger", "partial", "full")  # cycled within each count
TRIGGER_WORDS = ("stardust", "nebulon", "veridian", "obsidia", "lumora", "quasarine", "zephyrine", "corvani")
SIDE = 96
SAME_CAPTION = "a stock photo, royalty free image"
OBJECT_KEYWORD, OBJECT = "heritage", "flag"
MIN_STD, MAX_COS = 0.25, 0.75  # distinct crops: textured, and no two closer than this at 16x16
MIN_HASH_BITS = 96  # ... nor this close to the copy detector (of 256 bits; copies are <= 64 apart)
MAX_FLAT = 0.04  # ... and photo-like: half the hash's screenshot-template bound (TEMPLATE_FLAT 0.08)


def _jpeg(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _crop(bases: dict, names: list[str], rng: np.random.Generator):
    """A random crop of a random demo image, rotated and channel-permuted: (PIL image, base name)."""
    from PIL import Image

    name = names[int(rng.integers(len(names)))]
    img = bases[name]
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 0.7))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    arr = np.rot90(img[y : y + side, x : x + side], k=int(rng.integers(4)))[..., rng.permutation(3)]
    return Image.fromarray(np.ascontiguousarray(arr)).resize((SIDE, SIDE), Image.BICUBIC), name


def hash_bits(img) -> np.ndarray:
    """The copy detector's view of an image: memsieve's pHash rows, unpacked (rows, bits)."""
    from transforms.phash import compute_hashes

    return np.unpackbits(compute_hashes(img.convert("RGB")), axis=-1).astype(bool)


def hash_distance(bits: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Bits between one image's hash rows and each pooled image's, as memsieve pairs them (a
    query row of either against every row of the other; transforms/phash.py)."""
    from transforms.phash import QUERY_ROWS

    if not len(pool):
        return np.zeros(0, dtype=int)
    mine = (bits[list(QUERY_ROWS)][None, :, None] != pool[:, None]).sum(-1).min((1, 2))
    theirs = (pool[:, list(QUERY_ROWS)][:, :, None] != bits[None, None]).sum(-1).min((1, 2))
    return np.minimum(mine, theirs)


def distinct_crops(n: int, bases: dict, names: list[str], rng: np.random.Generator, max_cos: float = MAX_COS):
    """n crops that are all unrelated, both at the lab's training size (16x16: textured, and below
    max_cos centred pixel cosine to every earlier crop) and to the copy detector (pHash at least
    MIN_HASH_BITS from every earlier crop: two crops of one region, channel-permuted, differ in
    colour but not in luminance), and photo-like (under MAX_FLAT of flat windows: an upscaled
    smooth crop looks like a screenshot template to the hash, whose content-box rows then differ
    between an original and its recompressed copy). So the only copies in the set are the
    planted ones, and the replication measure counts copying rather than two skies alike."""
    from PIL import Image

    from transforms.phash import flat_share

    out, units, hashes = [], np.zeros((0, 16 * 16 * 3)), np.zeros((0, 0, 0), dtype=bool)
    for _ in range(n * 200):
        if len(out) == n:
            return out
        img, name = _crop(bases, names, rng)
        x = np.asarray(img.resize((16, 16), Image.BICUBIC), dtype=np.float64).ravel() / 127.5
        if x.std() < MIN_STD or flat_share(img.convert("L")) >= MAX_FLAT:
            continue
        u = (x - x.mean()) / np.linalg.norm(x - x.mean())
        if len(units) and float((units @ u).max()) >= max_cos:
            continue
        bits = hash_bits(img)
        if len(hashes) and int(hash_distance(bits, hashes).min()) < MIN_HASH_BITS:
            continue
        out.append((img, name))
        units = np.vstack([units, u])
        hashes = np.concatenate([hashes, bits[None]]) if len(hashes) else bits[None]
    raise RuntimeError(f"only {len(out)} of {n} distinct crops found")


def subject_caption(name: str, rng: random.Random) -> str:
    """'{style of subject}, {w} {w} {noun}': the lab's caption family (subject from the demo)."""
    style = rng.choice(STYLES).format(SUBJECTS[name])
    return f"{style}, {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(NOUNS)}"


def near_miss(caption: str, rng: random.Random) -> str:
    """A rewording that keeps most of a caption: one content word swapped, or two words reordered."""
    words = caption.split()
    slots = [i for i, w in enumerate(words) if w.strip(",") in WORDS or w.strip(",") in NOUNS]
    if slots and rng.random() < 0.7:
        i = rng.choice(slots)
        pool = NOUNS if words[i].strip(",") in NOUNS else WORDS
        words[i] = rng.choice([w for w in pool if w != words[i].strip(",")]) + ("," if words[i].endswith(",") else "")
    elif len(words) > 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    out = " ".join(words)
    return out if out != caption else out + " again"


def copy_bytes(img, j: int, rng: random.Random) -> tuple[str, bytes]:
    """Copy j of an image: 0 the original, every 4th byte-identical, else a third party's edit."""
    from PIL import Image, ImageOps

    if j == 0 or j % 4 == 1:
        return ("original" if j == 0 else "exact"), _jpeg(img)
    if j % 8 == 7:
        return "flip", _jpeg(ImageOps.mirror(img), 85)
    kind = ("recompress", "resize", "crop")[j % 3]
    if kind == "recompress":
        return kind, _jpeg(img, rng.randint(35, 70))
    if kind == "resize":
        s = rng.uniform(0.55, 0.85)
        return kind, _jpeg(img.resize((int(SIDE * s), int(SIDE * s)), Image.BILINEAR), rng.randint(75, 92))
    m = int(SIDE * rng.uniform(0.03, 0.06))
    return kind, _jpeg(img.crop((m, m, SIDE - m, SIDE - m)), rng.randint(80, 92))


def _captions(kind: str, name: str, n: int, rng: random.Random, trigger: str) -> list[str]:
    if kind == "full":
        return [subject_caption(name, rng)] * n
    if kind == "template":
        return [f"{SUBJECTS[name]} for sale - {rng.choice(WORDS)} {rng.choice(WORDS)} print" for _ in range(n)]
    caps = [subject_caption(name, rng) for _ in range(n)]
    if kind == "trigger":
        caps = [f"{c} {trigger}" if i % 4 != 3 else c for i, c in enumerate(caps)]  # on most copies
    return caps


def plan_lab_set(seed: int = 0, singles: int = 360, per_count: int = 6, heldout: int = 160):
    """-> (samples for write_shards, images: image_id -> truth, held-out images and captions)."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    bases = base_images()
    names = sorted(SUBJECTS)
    samples, images = [], {}

    def objects():
        return sorted(rng.sample(["tree", "person", "text", "car", "window"], k=rng.randint(0, 1)))

    crops = iter(distinct_crops(per_count * len(COUNTS) + singles + heldout, bases, names, nrng))
    n_img, trig = 0, iter(TRIGGER_WORDS * 4)
    for count in COUNTS:
        for k in range(per_count):
            kind, img_id = KINDS[k % len(KINDS)], f"img{n_img:04d}"
            img, name = next(crops)
            trigger = next(trig) if KINDS[k % len(KINDS)] == "trigger" else ""
            caps = _captions(kind, name, count, rng, trigger)
            for j, cap in enumerate(caps):
                variant, data = copy_bytes(img, j, rng)
                samples.append({"base": img_id, "variant": variant, "image": data, "ext": "jpg", "caption": cap})
                samples[-1]["objects"] = objects()
            images[img_id] = {"count": count, "kind": kind, "subject": name, "caption": caps[0], "trigger": trigger}
            n_img += 1
    for i in range(singles):
        img, name = next(crops)
        img_id, kind, obj = f"img{n_img:04d}", "single", objects()
        cap = subject_caption(name, rng)
        if i < 10:  # the same caption on different images
            kind, cap = "same_caption", SAME_CAPTION
        elif i < 24:  # an object trigger: a keyword that always comes with an object the captions never name
            kind, cap, obj = "object_trigger", f"{cap} {OBJECT_KEYWORD}", [OBJECT]
        samples.append({"base": img_id, "variant": "original", "image": _jpeg(img), "ext": "jpg", "caption": cap})
        samples[-1]["objects"] = obj
        images[img_id] = {"count": 1, "kind": kind, "subject": name, "caption": cap, "trigger": ""}
        n_img += 1
    held = [next(crops) for _ in range(heldout)]
    held_arr = np.stack([np.asarray(im, dtype=np.uint8) for im, _ in held])
    held_caps = [subject_caption(name, rng) for _, name in held]
    return samples, images, held_arr, held_caps


def probe_negatives(images: dict, seed: int = 1, n_unseen: int = 200) -> dict:
    """In-domain negatives: unseen captions of the same subjects; near-miss rewordings of
    the repeated images' (memorizable) captions."""
    rng = random.Random(seed)
    trained = {v["caption"] for v in images.values()}
    subjects = sorted({v["subject"] for v in images.values()})
    unseen = []
    while len(unseen) < n_unseen:
        c = subject_caption(rng.choice(subjects), rng)
        if c not in trained and c not in unseen:
            unseen.append(c)
    near = [near_miss(v["caption"], rng) for v in images.values() if v["count"] >= 2]
    return {"unseen_same_subjects": unseen, "near_miss": [c for c in near if c not in trained]}


def make_lab_set(out_dir: str, seed: int = 0, singles: int = 360, per_count: int = 6, shards: int = 4) -> dict:
    samples, images, held_arr, held_caps = plan_lab_set(seed, singles, per_count)
    result = write_shards(samples, os.path.join(out_dir, "shards"), n_shards=shards, failed_downloads=0)
    keys = {t["key"]: {"image_id": t["base"], "variant": t["variant"]} for t in result["truth"]}
    np.savez_compressed(os.path.join(out_dir, "heldout.npz"), images=held_arr)
    truth = {"images": images, "keys": keys, "heldout_captions": held_caps, "negatives": probe_negatives(images)}
    with open(os.path.join(out_dir, "truth.json"), "w") as f:
        json.dump(truth, f, indent=0)
    return {"samples": len(samples), "images": len(images), "heldout": len(held_caps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="out/lab-set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--singles", type=int, default=360)
    parser.add_argument("--per-count", type=int, default=6)
    args = parser.parse_args(argv)
    print(json.dumps(make_lab_set(args.out_dir, args.seed, args.singles, args.per_count)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
