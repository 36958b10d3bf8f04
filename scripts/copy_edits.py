"""The edits third parties make to photos on the web, for the hard copy test set.

Each edit is ``fn(img, rng, tpl=None) -> (img, params)``. Template edits (memes, screenshots)
take an optional template dict so a *decoy* can wrap an unrelated photo in exactly the same
template as a real copy (same texts, same layout): the detector must not link the two.
"""

from __future__ import annotations

import io
import math
import random

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

FONT_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
MEME_TEXTS = (
    ("WHEN THE WEEKEND", "FINALLY ARRIVES"),
    ("NOBODY:", "ABSOLUTELY NOBODY:"),
    ("ME AT 3 AM", "THINKING ABOUT LIFE"),
    ("THIS IS FINE", "EVERYTHING IS FINE"),
    ("ONE DOES NOT SIMPLY", "WALK INTO MONDAY"),
    ("MOM: WE HAVE FOOD AT HOME", "THE FOOD AT HOME:"),
)
CHAT_TEXTS = ("look at this!!", "omg where was this", "haha classic", "sent you the pic", "lol same", "wow")
USERS = ("travel_daily", "jenny.k", "photos_by_mark", "nature.lover", "dogsofinsta")


def font(size: int, bold: bool = True):
    try:
        return ImageFont.truetype(FONT_BOLD if bold else FONT, size)
    except OSError:
        return ImageFont.load_default(size=size)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def aspect(img, rng, tpl=None):
    r = rng.choice([rng.uniform(0.8, 0.9), rng.uniform(1.1, 1.25)])
    w, h = (round(img.width * r), img.height) if rng.random() < 0.5 else (img.width, round(img.height * r))
    return img.resize((w, h), Image.Resampling.BICUBIC), {"ratio": round(r, 3), "size": [w, h]}


def colour(img, rng, tpl=None):
    kind = rng.choice(["grayscale", "hue", "sepia", "saturation"])
    if kind == "grayscale":
        return ImageOps.grayscale(img).convert("RGB"), {"kind": kind}
    if kind == "sepia":
        g = ImageOps.grayscale(img)
        return ImageOps.colorize(g, (40, 26, 13), (255, 240, 192)), {"kind": kind}
    if kind == "saturation":
        f = rng.choice([0.3, 1.8, 2.2])
        return ImageEnhance.Color(img).enhance(f), {"kind": kind, "factor": f}
    shift = rng.randint(40, 200)
    h, s, v = img.convert("HSV").split()
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB"), {"kind": kind, "shift": shift}


def blur_noise(img, rng, tpl=None):
    import numpy as np

    params = {}
    if rng.random() < 0.7:
        r = rng.uniform(1.0, 2.5)
        img = img.filter(ImageFilter.GaussianBlur(r))
        params["blur"] = round(r, 2)
    if not params or rng.random() < 0.5:
        sigma = rng.uniform(6, 15)
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + np.random.default_rng(rng.randint(0, 2**31)).normal(0, sigma, arr.shape)
        img = Image.fromarray(arr.clip(0, 255).astype("uint8"))
        params["noise"] = round(sigma, 1)
    return img, params


def recompress(img, rng, tpl=None):
    chain = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.4:
            s = rng.uniform(0.5, 0.9)
            img = img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.Resampling.BILINEAR)
            chain.append(f"resize{s:.2f}")
        q = rng.randint(15, 50)
        img = jpeg(img, q)
        chain.append(f"q{q}")
    return img, {"chain": chain}


def _text(draw, xy, text, size, fill, stroke=0, anchor="mm"):
    draw.text(xy, text, font=font(size), fill=fill, anchor=anchor, stroke_width=stroke, stroke_fill=(0, 0, 0))


def meme(img, rng, tpl=None):
    tpl = tpl or {
        "texts": list(rng.choice(MEME_TEXTS)),
        "style": rng.choice(["bars", "bars", "overlay", "top_bar"]),
        "bar": rng.uniform(0.14, 0.24),
    }
    top, bottom = tpl["texts"]
    w, h = img.width, img.height
    size = max(10, round(0.9 * w / (0.68 * max(len(top), len(bottom), 10))))  # DejaVu Bold: ~0.68 em a glyph
    if tpl["style"] == "overlay":  # impact-style white text with a black outline over the photo
        out = img.copy()
        d = ImageDraw.Draw(out)
        _text(d, (w // 2, round(h * 0.1)), top, size, (255, 255, 255), stroke=max(2, size // 12))
        _text(d, (w // 2, round(h * 0.9)), bottom, size, (255, 255, 255), stroke=max(2, size // 12))
        return out, tpl
    bar = round(h * tpl["bar"])
    n_bars = 2 if tpl["style"] == "bars" else 1
    out = Image.new("RGB", (w, h + bar * n_bars), (255, 255, 255))
    out.paste(img, (0, bar))
    d = ImageDraw.Draw(out)
    _text(d, (w // 2, bar // 2), top, size, (0, 0, 0))
    if n_bars == 2:
        _text(d, (w // 2, h + bar + bar // 2), bottom, size, (0, 0, 0))
    return out, tpl


def _largest_inner(w: float, h: float, angle: float) -> tuple[float, float]:
    """The largest axis-aligned rectangle inside a w x h rectangle rotated by angle (radians)."""
    sin_a, cos_a = abs(math.sin(angle)), abs(math.cos(angle))
    side_long, side_short = max(w, h), min(w, h)
    if side_short <= 2.0 * sin_a * cos_a * side_long or abs(sin_a - cos_a) < 1e-10:
        x = 0.5 * side_short
        return (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
    cos_2a = cos_a * cos_a - sin_a * sin_a
    return (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a


def rotate(img, rng, tpl=None):
    deg = rng.choice([-1, 1]) * rng.uniform(2, 10)
    mode = rng.choice(["black_corners", "expanded", "inner_crop"])
    if mode == "black_corners":
        return img.rotate(deg, Image.Resampling.BICUBIC), {"deg": round(deg, 2), "mode": mode}
    fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    out = img.rotate(deg, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)
    if mode == "inner_crop":
        cw, ch = _largest_inner(img.width, img.height, math.radians(deg))
        left, top = (out.width - cw) / 2, (out.height - ch) / 2
        out = out.crop((math.ceil(left), math.ceil(top), math.floor(left + cw), math.floor(top + ch)))
    return out, {"deg": round(deg, 2), "mode": mode}


def crop(img, rng, tpl=None):
    area = rng.uniform(0.5, 0.9)
    r = rng.uniform(0.75, 1.33)  # the crop's side ratio relative to the photo's
    fw, fh = min(1.0, math.sqrt(area * r)), min(1.0, math.sqrt(area / r))
    w, h = round(img.width * fw), round(img.height * fh)
    left, top = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
    return img.crop((left, top, left + w, top + h)), {"area": round(fw * fh, 3), "box": [left, top, w, h]}


def border(img, rng, tpl=None):
    kind = rng.choice(["uniform", "letterbox", "blurred"])
    w, h = img.size
    if kind == "uniform":
        colour_ = tuple(rng.randint(0, 255) for _ in range(3)) if rng.random() < 0.5 else (255, 255, 255)
        pads = [round(rng.uniform(0.04, 0.15) * (w if i % 2 == 0 else h)) for i in range(4)]
        return ImageOps.expand(img, tuple(pads), fill=colour_), {"kind": kind, "pads": pads}
    target = rng.choice([16 / 9, 9 / 16, 1.0, 4 / 5]) if kind == "letterbox" else rng.choice([1.0, 9 / 16, 16 / 9])
    if abs(target - w / h) < 0.15:
        target = 16 / 9 if w / h < 1.3 else 9 / 16
    cw, ch = (round(h * target), h) if target > w / h else (w, round(w / target))
    if kind == "letterbox":
        canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    else:
        canvas = img.resize((cw, ch), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(max(cw, ch) / 25))
    canvas.paste(img, ((cw - w) // 2, (ch - h) // 2))
    return canvas, {"kind": kind, "canvas": [cw, ch]}


def flip(img, rng, tpl=None):
    return ImageOps.mirror(img), {}


def _fit(img, width: int) -> Image.Image:
    return img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS)


def _lines(d, x, y, n, width, rng_seed, colour_=(200, 200, 200), step=16):
    r = random.Random(rng_seed)
    for i in range(n):
        d.rectangle((x, y + i * step, x + round(width * r.uniform(0.5, 1.0)), y + i * step + 7), fill=colour_)


def screenshot(img, rng, tpl=None):
    tpl = tpl or {
        "kind": rng.choice(["browser", "phone", "chat"]),
        "user": rng.choice(USERS),
        "text": rng.choice(CHAT_TEXTS),
        "seed": rng.randint(0, 9),
        "dark": rng.random() < 0.3,
    }
    bg, fg = ((24, 24, 24), (230, 230, 230)) if tpl["dark"] else ((255, 255, 255), (20, 20, 20))
    if tpl["kind"] == "browser":
        out = Image.new("RGB", (900, 620), bg)
        d = ImageDraw.Draw(out)
        d.rectangle((0, 0, 900, 34), fill=(222, 225, 230))
        d.rectangle((10, 6, 210, 34), fill=(255, 255, 255))
        d.text((20, 12), f"{tpl['user']} - Photos", font=font(13, False), fill=(40, 40, 40))
        d.rectangle((0, 34, 900, 70), fill=(245, 245, 245))
        d.rounded_rectangle((80, 40, 820, 64), 10, fill=(255, 255, 255), outline=(200, 200, 200))
        d.text((95, 45), f"https://www.photoshare.example/{tpl['user']}/p/{tpl['seed']}", font=font(13, False), fill=fg)
        photo = _fit(img, 520)
        photo = photo.crop((0, 0, photo.width, min(photo.height, 520)))
        out.paste(photo, (40, 90))
        _lines(d, 590, 100, 14, 280, tpl["seed"], colour_=(190, 190, 190) if not tpl["dark"] else (90, 90, 90))
        return out, tpl
    if tpl["kind"] == "phone":
        out = Image.new("RGB", (420, 860), bg)
        d = ImageDraw.Draw(out)
        d.text((16, 8), "9:41", font=font(15), fill=fg)
        d.rectangle((360, 12, 400, 22), outline=fg)
        d.text((150, 44), "Photogram", font=font(20), fill=fg)
        d.ellipse((12, 90, 48, 126), fill=(200, 120, 80))
        d.text((58, 98), tpl["user"], font=font(15), fill=fg)
        photo = _fit(img, 420)
        photo = photo.crop((0, 0, 420, min(photo.height, 520)))
        out.paste(photo, (0, 140))
        y = 140 + photo.height + 12
        for i in range(4):
            d.ellipse((14 + i * 40, y, 40 + i * 40, y + 26), outline=fg, width=2)
        d.text((14, y + 40), f"{tpl['user']} {tpl['text']}", font=font(14, False), fill=fg)
        _lines(d, 14, y + 70, 3, 380, tpl["seed"])
        return out, tpl
    out = Image.new("RGB", (420, 820), (236, 229, 221) if not tpl["dark"] else (11, 20, 26))
    d = ImageDraw.Draw(out)
    d.rectangle((0, 0, 420, 64), fill=(7, 94, 84))
    d.text((64, 22), tpl["user"], font=font(17), fill=(255, 255, 255))
    d.rounded_rectangle((14, 84, 260, 124), 8, fill=(255, 255, 255))
    d.text((24, 94), tpl["text"], font=font(14, False), fill=(20, 20, 20))
    photo = _fit(img, 300)
    photo = photo.crop((0, 0, 300, min(photo.height, 400)))
    d.rounded_rectangle((100, 140, 420 - 10, 150 + photo.height + 30), 8, fill=(220, 248, 198))
    out.paste(photo, (105, 145))
    d.text((330, 150 + photo.height + 8), "12:0" + str(tpl["seed"]), font=font(11, False), fill=(90, 90, 90))
    d.rounded_rectangle((14, 740, 406, 790), 20, fill=(255, 255, 255))
    return out, tpl


EDITS = {
    "aspect": aspect,
    "colour": colour,
    "blur_noise": blur_noise,
    "recompress": recompress,
    "meme": meme,
    "rotate": rotate,
    "crop": crop,
    "border": border,
    "flip": flip,
    "screenshot": screenshot,
}
# the order edits are applied in when combined: geometry first, then framing, then pixels
COMBINE_ORDER = (
    "flip",
    "crop",
    "rotate",
    "aspect",
    "border",
    "meme",
    "screenshot",
    "colour",
    "blur_noise",
    "recompress",
)


def combined(img, rng, tpl=None):
    framing = {"border", "meme", "screenshot"}
    names = rng.sample([n for n in COMBINE_ORDER if n not in framing], rng.randint(1, 2))
    names += rng.sample(sorted(framing), 1) if rng.random() < 0.5 else []
    if len(names) < 2:
        names += rng.sample([n for n in COMBINE_ORDER if n not in names and n not in framing], 1)
    params = {}
    for name in sorted(names, key=COMBINE_ORDER.index):
        img, params[name] = EDITS[name](img, rng)
    return img, params
