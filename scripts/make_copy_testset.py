"""Build a copy-detection evaluation set from real photos (never written into the repo).

    python scripts/make_copy_testset.py [--images ../shared/data/flickr8k-dev/images]
        [--out out/copyset] [--sources 200] [--seed 0]

For ``--sources`` photos, writes copies made the way third parties make them: downscales,
JPEG re-encodes at quality 20-40, centre crops keeping 85-93% of each side, a small text
watermark, a brightness shift, and combinations. Every other photo is kept as a distractor
(Flickr8k holds genuinely similar photos of different scenes, which is what precision
measures). Writes ``OUT/images/*.jpg`` and ``OUT/manifest.jsonl`` with one row per image:
``file``, ``source`` (the photo it was made from; itself for originals), ``transform``,
``params``, and ``split`` (tune/test, by source, so thresholds are tuned on other photos).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil

from PIL import Image, ImageDraw, ImageEnhance, ImageFont

WATERMARK_TEXTS = ("(c) stockfoto", "www.example.com", "SAMPLE", "@photo_daily", "shutterpix.net", "(c) 2019 J. Doe")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def downscale(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    long_side = rng.randint(128, 320)
    scale = long_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    method = rng.choice([Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS])
    return img.resize(size, method), {"long_side": long_side}


def reencode(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    quality = rng.randint(20, 40)
    return jpeg(img, quality), {"quality": quality}


def centre_crop(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    fx, fy = rng.uniform(0.85, 0.93), rng.uniform(0.85, 0.93)
    w, h = round(img.width * fx), round(img.height * fy)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h)), {"keep_w": round(fx, 3), "keep_h": round(fy, 3)}


def watermark(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    text = rng.choice(WATERMARK_TEXTS)
    size = max(8, round(img.height * rng.uniform(0.04, 0.08)))
    font = ImageFont.load_default(size=size)
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    tw, th = x1 - x0, y1 - y0
    margin = max(2, img.width // 40)
    where = rng.choice(["bottom_right", "bottom_left", "top_left", "centre"])
    x = {"bottom_right": img.width - tw - margin, "centre": (img.width - tw) // 2}.get(where, margin)
    y = {"top_left": margin, "centre": (img.height - th) // 2}.get(where, img.height - th - margin)
    shade = rng.choice([(255, 255, 255), (0, 0, 0)])
    alpha = rng.randint(140, 230)
    draw.text((x - x0, y - y0), text, font=font, fill=(*shade, alpha))
    out = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    return out, {"text": text, "size": size, "where": where}


def brightness(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    if rng.random() < 0.5:
        factor = rng.choice([rng.uniform(0.7, 0.85), rng.uniform(1.15, 1.35)])
        return ImageEnhance.Brightness(img).enhance(factor), {"factor": round(factor, 3)}
    offset = rng.choice([-1, 1]) * rng.randint(20, 45)
    return img.point(lambda v: max(0, min(255, v + offset))), {"offset": offset}


STEPS = {
    "downscale": downscale,
    "jpeg": reencode,
    "crop": centre_crop,
    "watermark": watermark,
    "brightness": brightness,
}

# each copy: the steps applied in order; the last JPEG save (quality 90) stands for the file format
COPIES = {
    "downscale": ["downscale"],
    "jpeg": ["jpeg"],
    "crop": ["crop"],
    "watermark": ["watermark"],
    "brightness": ["brightness"],
    "crop+jpeg": ["crop", "jpeg"],
    "downscale+watermark": ["downscale", "watermark"],
    "crop+brightness": ["crop", "brightness"],
    "crop+downscale+watermark+jpeg": ["crop", "downscale", "watermark", "jpeg"],
}


def make_copy(img: Image.Image, steps: list[str], rng: random.Random) -> tuple[Image.Image, dict]:
    params = {}
    for step in steps:
        img, p = STEPS[step](img, rng)
        params[step] = p
    return img, params


def build(images_dir: str, out_dir: str, n_sources: int, seed: int) -> int:
    names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    sources = set(order[:n_sources])
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    for i, name in enumerate(names):
        stem = os.path.splitext(name)[0]
        img = Image.open(os.path.join(images_dir, name)).convert("RGB")
        split = "tune" if i % 2 == 0 else "test"
        if name.lower().endswith((".jpg", ".jpeg")):  # the original file as it is
            shutil.copyfile(os.path.join(images_dir, name), os.path.join(out_dir, "images", f"{stem}.jpg"))
        else:
            img.save(os.path.join(out_dir, "images", f"{stem}.jpg"), "JPEG", quality=95)
        rows.append({"file": f"{stem}.jpg", "source": stem, "transform": "original", "params": {}, "split": split})
        if name not in sources:
            continue
        for copy_name, steps in COPIES.items():
            copy_rng = random.Random(f"{seed}:{stem}:{copy_name}")
            out, params = make_copy(img, steps, copy_rng)
            file = f"{stem}__{copy_name.replace('+', '-')}.jpg"
            quality = 90 if steps[-1] != "jpeg" else params["jpeg"]["quality"]
            out.save(os.path.join(out_dir, "images", file), "JPEG", quality=quality)
            rows.append({"file": file, "source": stem, "transform": copy_name, "params": params, "split": split})
    with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="../shared/data/flickr8k-dev/images")
    parser.add_argument("--out", default="out/copyset")
    parser.add_argument("--sources", type=int, default=200, help="photos that get copies; the rest are distractors")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = build(args.images, args.out, args.sources, args.seed)
    print(f"wrote {n} images and manifest.jsonl under {args.out}")


if __name__ == "__main__":
    main()
