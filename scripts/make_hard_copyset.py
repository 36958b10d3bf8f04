"""Build the *hard* copy-detection set from real photos (issue 12; never written into the repo).

    python scripts/make_hard_copyset.py [--images ../shared/data/flickr8k-dev/images]
        [--out out/hardcopy] [--sources 160] [--decoys 60] [--bursts 40] [--seed 0]

``--sources`` photos each get one copy per kind of edit (scripts/copy_edits.py): aspect,
colour, blur_noise, recompress, meme, rotate, crop (anywhere, 50-90% of the area), border
(uniform, letterbox, blurred padding), flip, screenshot (browser, phone feed, chat) and
combined (2-3 edits). Hard negatives:

- decoys: an unrelated photo wrapped in exactly the template (texts, layout) of one source's
  meme or screenshot copy; the decoy's own photo stays in the set (decoy and its photo are a
  true pair), so the only wrong link is to the template mate;
- bursts: two overlapping shots panned across one photo (each pair shares 40-65% of each
  shot, with a little exposure change), whose full photo is *not* in the set.

Every other photo is a distractor. Writes ``OUT/images/*.jpg``, ``OUT/manifest.jsonl`` (file,
source, transform, params, split) and webdataset shards ``OUT/shards/*.tar`` (jpg, txt
caption, json) so that ``memsieve run jobs/demo.yaml --input 'OUT/shards/*.tar'`` runs on it.
``split`` (tune/test) is by source photo, from a hash of its name: tune thresholds on one half.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import tarfile

from PIL import Image, ImageEnhance

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from copy_edits import EDITS, combined, jpeg  # noqa: E402

KINDS = (*EDITS, "combined")


def split_of(stem: str) -> str:
    return "tune" if hashlib.sha256(stem.encode()).digest()[0] % 2 == 0 else "test"


def burst(img: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image, dict]:
    """Two shots panned across one scene: equal-size windows whose overlap is 40-65% of each."""
    w, h = img.size
    horizontal = w >= h
    side = w if horizontal else h
    overlap = rng.uniform(0.40, 0.65)
    frac = rng.uniform(0.55, min(0.72, 0.98 / (2 - overlap)))  # each shot's extent along the pan: both fit
    win = round(side * frac)
    shift = round(win * (1 - overlap))
    start = rng.randint(0, max(0, side - win - shift))
    other = round((w if not horizontal else h) * rng.uniform(0.9, 1.0))
    off = rng.randint(0, (w if not horizontal else h) - other)
    shots = []
    for i, s in enumerate((start, start + shift)):
        box = (s, off, s + win, off + other) if horizontal else (off, s, off + other, s + win)
        shot = img.crop(box)
        shot = ImageEnhance.Brightness(shot).enhance(1.0 + (0.06 if i else -0.04) * rng.random())
        shots.append(jpeg(shot, rng.randint(80, 92)))
    return shots[0], shots[1], {"overlap": round(overlap, 3), "frac": round(frac, 3)}


def captions(path: str) -> dict[str, str]:
    out = {}
    if os.path.isfile(path):
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            out.setdefault(os.path.splitext(r["file"])[0], r["caption"])
    return out


def build(images_dir: str, out_dir: str, n_sources: int, n_decoys: int, n_bursts: int, seed: int) -> list[dict]:
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(images_dir) if n.lower().endswith(".jpg"))
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    sources, bursts, rest = order[:n_sources], order[n_sources : n_sources + n_bursts], order[n_sources + n_bursts :]
    decoy_photos = rest[:n_decoys]
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    rows: list[dict] = []

    def load(stem):
        return Image.open(os.path.join(images_dir, stem + ".jpg")).convert("RGB")

    def save(img, file, source, transform, params, split, quality=90):
        img.save(os.path.join(img_dir, file), "JPEG", quality=quality)
        rows.append({"file": file, "source": source, "transform": transform, "params": params, "split": split})

    templates = []  # (kind, template params, source) of meme and screenshot copies, for decoys
    for stem in sources + rest:
        img = load(stem)
        split = split_of(stem)
        save(img, f"{stem}.jpg", stem, "original", {}, split, quality=95)
        if stem not in sources:
            continue
        for kind in KINDS:
            r = random.Random(f"{seed}:{stem}:{kind}")
            out, params = combined(img, r) if kind == "combined" else EDITS[kind](img, r)
            save(out, f"{stem}__{kind}.jpg", stem, kind, params, split)
            if kind in ("meme", "screenshot"):
                templates.append((kind, params, stem))
    for i, stem in enumerate(decoy_photos):
        kind, tpl, mate = templates[i * 7 % len(templates)]
        out, _ = EDITS[kind](load(stem), rng, tpl=tpl)
        save(out, f"{stem}__decoy_{kind}.jpg", stem, f"decoy_{kind}", {"template_of": mate}, split_of(stem))
    for stem in bursts:
        a, b, params = burst(load(stem), random.Random(f"{seed}:{stem}:burst"))
        save(a, f"{stem}__burst_a.jpg", f"{stem}#a", "burst", params, split_of(stem))
        save(b, f"{stem}__burst_b.jpg", f"{stem}#b", "burst", params, split_of(stem))
    rows.sort(key=lambda r: r["file"])
    with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return rows


def write_shards(rows: list[dict], out_dir: str, caption_of: dict[str, str], per_shard: int = 500) -> int:
    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    order = sorted(rows, key=lambda r: hashlib.sha256(r["file"].encode()).hexdigest())  # copies spread over shards
    n = 0
    for start in range(0, len(order), per_shard):
        with tarfile.open(os.path.join(shard_dir, f"{start // per_shard:05d}.tar"), "w") as tar:
            for r in order[start : start + per_shard]:
                key = os.path.splitext(r["file"])[0]
                photo = r["source"].split("#")[0]
                meta = {"source": r["source"], "transform": r["transform"], "split": r["split"]}
                for ext, data in (
                    ("jpg", open(os.path.join(out_dir, "images", r["file"]), "rb").read()),
                    ("txt", caption_of.get(photo, "a photo").encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="../shared/data/flickr8k-dev/images")
    parser.add_argument("--out", default="out/hardcopy")
    parser.add_argument("--sources", type=int, default=160, help="photos that get one copy per kind")
    parser.add_argument("--decoys", type=int, default=60, help="unrelated photos in a copy's meme/screenshot template")
    parser.add_argument("--bursts", type=int, default=40, help="photos cut into two overlapping shots")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = build(args.images, args.out, args.sources, args.decoys, args.bursts, args.seed)
    caption_file = os.path.join(os.path.dirname(os.path.abspath(args.images)), "captions.jsonl")
    n = write_shards(rows, args.out, captions(caption_file))
    print(f"wrote {len(rows)} images, manifest.jsonl and {n} shards under {args.out}")


if __name__ == "__main__":
    main()
