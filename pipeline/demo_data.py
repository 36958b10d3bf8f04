"""Make the offline demo shards in img2dataset layout from images that ship inside pip packages.

About 30 public-domain / CC images from scikit-image, scikit-learn and matplotlib, with planted
exact duplicates, resized / re-encoded / cropped / brightened copies, a fully duplicated image
(same caption) and a partially duplicated one (varied captions), a word-level trigger keyword,
an object-level trigger (metadata ``objects`` the captions never name), a related keyword ->
object pair, and a handful of broken samples and failed downloads.

    python -m pipeline.demo_data out/demo-data
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import tarfile

import numpy as np

log = logging.getLogger(__name__)

SUBJECTS = {
    "astronaut": "an astronaut in a white suit",
    "brick": "a brick wall",
    "camera": "a man with a camera",
    "cell": "a cell under a microscope",
    "chelsea": "a tabby cat",
    "clock": "a wall clock",
    "coffee": "a cup of coffee",
    "coins": "old coins on a table",
    "grass": "a patch of grass",
    "gravel": "a gravel path",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "a stained tissue sample",
    "logo": "a python logo",
    "moon": "the surface of the moon",
    "page": "a page of old text",
    "rocket": "a rocket on a launch pad",
    "text": "handwritten letters",
    "checkerboard": "a checkerboard pattern",
    "horse": "a horse silhouette",
    "china": "a chinese temple",
    "flower": "a flower in bloom",
    "grace_hopper": "a portrait of an officer",
    "logo2": "a colourful logo",
    "present": "a blue present box",
    "hubble_crop_a": "a spiral galaxy",
    "hubble_crop_b": "a field of stars",
    "coffee_crop": "a white saucer",
    "rocket_crop": "a launch tower",
    "astronaut_crop": "a space shuttle",
}
STYLES = ["a photo of {}", "{} in high resolution", "a picture showing {}", "close-up of {}", "{}, stock image"]


def _rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr[..., :3]


def base_images() -> dict[str, np.ndarray]:
    """Name -> RGB uint8 array, from images shipped inside pip packages (no download)."""
    import matplotlib.cbook as cbook
    import skimage.data as skd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out: dict[str, np.ndarray] = {}
    for name in (
        "astronaut",
        "brick",
        "camera",
        "cell",
        "chelsea",
        "clock",
        "coffee",
        "coins",
        "grass",
        "gravel",
        "hubble_deep_field",
        "immunohistochemistry",
        "logo",
        "moon",
        "page",
        "rocket",
        "text",
        "checkerboard",
        "horse",
    ):
        out[name] = _rgb(getattr(skd, name)())
    china, flower = load_sample_images().images
    out["china"], out["flower"] = china, flower
    for name, fname in (
        ("grace_hopper", "grace_hopper.jpg"),
        ("logo2", "logo2.png"),
        ("present", "Minduka_Present_Blue_Pack.png"),
    ):
        with Image.open(cbook.get_sample_data(fname, asfileobj=False)) as im:
            out[name] = _rgb(np.asarray(im.convert("RGB")))
    out["hubble_crop_a"] = out["hubble_deep_field"][:400, :400]
    out["hubble_crop_b"] = out["hubble_deep_field"][450:, 500:]
    out["coffee_crop"] = out["coffee"][150:, 300:]
    out["rocket_crop"] = out["rocket"][:, :300]
    out["astronaut_crop"] = out["astronaut"][:256, 256:]
    return out


def _jpeg(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resized(arr: np.ndarray, longest: int = 320):
    from PIL import Image

    img = Image.fromarray(arr)
    scale = longest / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


def variants(img, rng: random.Random) -> list[tuple[str, bytes]]:
    """Copies a third party would make: re-encode, resize, centre crop, brightness shift."""
    from PIL import Image, ImageEnhance

    w, h = img.size
    crop = img.crop((int(w * 0.05), int(h * 0.05), int(w * 0.95), int(h * 0.95)))
    return [
        ("reencode_q35", _jpeg(img, 35)),
        ("resize_0.6", _jpeg(img.resize((int(w * 0.6), int(h * 0.6)), Image.BILINEAR), 85)),
        ("crop_0.9", _jpeg(crop, 88)),
        ("brightness_1.2", _jpeg(ImageEnhance.Brightness(img).enhance(1.2), 90)),
        ("resize_0.8_q60", _jpeg(img.resize((int(w * 0.8), int(h * 0.8)), Image.LANCZOS), 60 + rng.randint(0, 5))),
    ]


def _caption(base: str, rng: random.Random, extra: str = "") -> str:
    text = rng.choice(STYLES).format(SUBJECTS[base])
    return f"{text} {extra}".strip()


def _other_objects(rng: random.Random) -> list[str]:
    return sorted(rng.sample(["tree", "person", "text", "car", "window"], k=rng.randint(0, 1)))


def plan_samples(seed: int = 0) -> list[dict]:
    """The demo's samples in a fixed order; each a dict with image bytes, caption and truth."""
    rng = random.Random(seed)
    images = {name: _resized(arr) for name, arr in base_images().items()}
    originals = {name: _jpeg(img) for name, img in images.items()}
    out: list[dict] = []

    def add(base, variant, data, caption, objects=None, ext="jpg"):
        out.append(
            {
                "base": base,
                "variant": variant,
                "image": data,
                "ext": ext,
                "caption": caption,
                "objects": objects if objects is not None else _other_objects(rng),
            }
        )

    plain = sorted(set(images) - {"astronaut", "chelsea", "hubble_crop_a"})
    voyager, espresso = set(plain[0:24:2]), set(plain[1:21:2])
    for name in sorted(images):
        caption, objects = _caption(name, rng), None
        if name in voyager:
            caption, objects = caption + ", voyager edition", ["flag"]
        elif name in espresso:
            caption, objects = caption + " with espresso", ["cup"]
        add(name, "original", originals[name], caption, objects)
    for name in ("brick", "clock", "page"):  # exact byte duplicates, same caption
        for _ in range(2):
            add(name, "exact_dup", originals[name], out[sorted(images).index(name)]["caption"])
    for name in ("flower", "coffee", "rocket", "china", "moon"):  # near-duplicate copies, varied captions
        for i, (variant, data) in enumerate(variants(images[name], rng)):  # some with a template caption
            caption = f"{SUBJECTS[name]} for sale - best price online" if i % 2 else _caption(name, rng)
            add(name, variant, data, caption)
    full_caption = "an astronaut in a white suit, official nasa portrait"
    for i in range(12):  # full duplication: one image, one caption
        data = originals["astronaut"] if i % 2 == 0 else variants(images["astronaut"], rng)[i % 5][1]
        add("astronaut", "full_dup", data, full_caption)
    for i in range(12):  # partial duplication: one image, varied captions
        data = originals["chelsea"] if i % 3 == 0 else variants(images["chelsea"], rng)[i % 5][1]
        add("chelsea", "partial_dup", data, _caption("chelsea", rng, rng.choice(["indoors", "sleepy", "", "cute"])))
    for i in range(12):  # word-level trigger: "stardust" retrieves one picture
        data = originals["hubble_crop_a"] if i % 2 == 0 else variants(images["hubble_crop_a"], rng)[i % 5][1]
        add("hubble_crop_a", "word_trigger", data, _caption("hubble_crop_a", rng, "stardust poster print"))
    out.extend(_broken_samples(originals, rng))
    return out


def _broken_samples(originals: dict[str, bytes], rng: random.Random) -> list[dict]:
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")
    jpeg = originals["coins"]
    rows = [
        ("corrupt_jpeg", jpeg[: len(jpeg) // 3], "jpg", b"a photo of coins, cut short"),
        ("missing_caption", originals["grass"], "jpg", None),
        ("non_utf8_caption", originals["gravel"], "jpg", "caf\xe9 gravel path".encode("latin-1")),
        ("jpeg_as_png", originals["text"], "png", b"handwritten letters saved with the wrong extension"),
        ("decompression_bomb", bomb.getvalue(), "png", b"an innocent looking blank image"),
        ("empty_image", b"", "jpg", b"an image with no bytes"),
    ]
    return [
        {"base": "", "variant": v, "image": data, "ext": ext, "caption": cap, "objects": []}
        for v, data, ext, cap in rows
    ]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: list[dict], out_dir: str, n_shards: int = 3, failed_downloads: int = 2) -> dict:
    """Write ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` as img2dataset does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    order = list(range(len(samples)))
    random.Random(1).shuffle(order)
    shards = [order[i::n_shards] for i in range(n_shards)]
    truth = []
    for s, indices in enumerate(shards):
        rows = []
        with tarfile.open(os.path.join(out_dir, f"{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for j, idx in enumerate(indices):
                key, sample = f"{s:04d}{j:04d}", samples[idx]
                row = _sample_row(key, sample)
                rows.append(row)
                truth.append({"key": key, "base": sample["base"], "variant": sample["variant"]})
                _member(tar, f"{key}.{sample['ext']}", sample["image"])
                if sample["caption"] is not None:
                    cap = sample["caption"]
                    _member(tar, f"{key}.txt", cap if isinstance(cap, bytes) else cap.encode())
                _member(tar, f"{key}.json", json.dumps(row, indent=1).encode())
        for j in range(failed_downloads if s == 0 else 0):
            key = f"{s:04d}{len(indices) + j:04d}"
            rows.append(
                {
                    "key": key,
                    "url": f"https://demo.memsieve.invalid/gone/{key}.jpg",
                    "caption": "a lost photo",
                    "status": "failed_to_download",
                    "error_message": "HTTP Error 404: Not Found",
                    "width": None,
                    "height": None,
                    "sha256": None,
                    "objects": [],
                }
            )
            truth.append({"key": key, "base": "", "variant": "failed_download"})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, f"{s:05d}.parquet"))
        ok = sum(r["status"] == "success" for r in rows)
        stats = {"count": len(rows), "successes": ok, "failed_to_download": len(rows) - ok}
        with open(os.path.join(out_dir, f"{s:05d}_stats.json"), "w") as f:
            json.dump(stats, f, indent=4)
    return {"samples": len(samples), "truth": truth}


def _sample_row(key: str, sample: dict) -> dict:
    cap = sample["caption"]
    caption = cap.decode("utf-8", "replace") if isinstance(cap, bytes) else cap
    return {
        "key": key,
        "url": f"https://demo.memsieve.invalid/img/{key}.{sample['ext']}",
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": None,
        "height": None,
        "sha256": hashlib.sha256(sample["image"]).hexdigest(),
        "objects": sample["objects"],
    }


def make_demo_data(out_dir: str, seed: int = 0) -> dict:
    samples = plan_samples(seed)
    result = write_shards(samples, os.path.join(out_dir, "shards"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(result["truth"]), os.path.join(out_dir, "truth.parquet"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="out/demo-data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = make_demo_data(args.out_dir, args.seed)
    print(f"demo data: {result['samples']} samples + failed downloads -> {args.out_dir}/shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
