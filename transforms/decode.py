"""Decode images once: dimensions, a pixel hash for exact copies, and perceptual hash codes.

Pure ``decode_image`` does the checks (format vs. file name, decompression bombs, corrupt
data) and returns an RGB PIL image or a ``Failure``. ``DecodeImages`` runs it per sample.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Iterator

import apache_beam as beam

from pipeline import progress
from schemas.elements import Failure, Sample, SampleInfo

log = logging.getLogger(__name__)

INFOS = "infos"
CODES = "codes"
FAILURES = "failures"

# which PIL formats each member extension may hold
EXTENSION_FORMATS = {
    "jpg": {"JPEG", "MPO"},
    "jpeg": {"JPEG", "MPO"},
    "png": {"PNG"},
    "webp": {"WEBP"},
    "bmp": {"BMP"},
    "gif": {"GIF"},
    "tiff": {"TIFF"},
    "tif": {"TIFF"},
    "ppm": {"PPM"},
    "pgm": {"PPM"},
    "pbm": {"PPM"},
    "pnm": {"PPM"},
}


class DecodeError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def _to_rgb(img):
    """Any mode (palette, CMYK, 16-bit, alpha, grayscale) -> 8-bit RGB; alpha over white."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0  # 16-bit samples -> 8-bit
        img = Image.fromarray((arr * scale).round().clip(0, 255).astype("uint8"), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, ext: str, max_pixels: int):
    """Bytes -> RGB PIL image, or raise DecodeError with a specific error type."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "?"
            allowed = EXTENSION_FORMATS.get(ext.lower())
            if allowed is not None and fmt not in allowed:
                raise DecodeError("format_mismatch", f"{fmt} data under a .{ext} name")
            width, height = img.size
            if width <= 0 or height <= 0:
                raise DecodeError("bad_dimensions", f"{width}x{height}")
            if width * height > max_pixels:
                raise DecodeError("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
            img.load()
            return _to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError as exc:
        raise DecodeError("unidentified_image", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def pixel_digest(img) -> str:
    """sha256 over the RGB pixels and the size: equal for the same picture in other encodings."""
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


class DecodeImagesFn(beam.DoFn):
    def __init__(self, max_pixels: int, phash: bool, pixel_hash: bool = True):
        self.max_pixels = max_pixels
        self.phash = phash
        self.pixel_hash = pixel_hash
        self._hash = None

    def setup(self):
        self._decoded = beam.metrics.Metrics.counter("decode", "decoded")
        self._usec = beam.metrics.Metrics.distribution("decode", "usec")
        if self.phash:
            from transforms.phash import compute_hashes

            self._hash = compute_hashes

    def process(self, sample: Sample) -> Iterator:
        start = time.perf_counter()
        try:
            img = decode_image(sample.image, sample.image_ext, self.max_pixels)
        except DecodeError as exc:
            beam.metrics.Metrics.counter("decode", f"failed_{exc.error_type}").inc()
            yield beam.pvalue.TaggedOutput(
                FAILURES,
                Failure(
                    sample.key,
                    sample.shard,
                    "decode",
                    exc.error_type,
                    str(exc)[:500],
                    sample.url,
                    sample.caption,
                    sample.sha256,
                ),
            )
            return
        yield SampleInfo(
            sample.key,
            sample.shard,
            sample.url,
            sample.caption,
            sample.sha256,
            pixel_digest(img) if self.pixel_hash else "",
            img.width,
            img.height,
            sample.meta_json,
        )
        if self._hash is not None:
            yield beam.pvalue.TaggedOutput(CODES, (sample.key, self._hash(img).tobytes()))
        self._decoded.inc()
        progress.advance("samples decoded")
        self._usec.update(int((time.perf_counter() - start) * 1e6))


class DecodeImages(beam.PTransform):
    """Samples -> {"infos": SampleInfo, "codes": (key, phash bytes), "failures": Failure}."""

    def __init__(self, max_pixels: int, phash: bool, pixel_hash: bool = True):
        super().__init__()
        self.max_pixels = max_pixels
        self.phash = phash
        self.pixel_hash = pixel_hash

    def expand(self, samples):
        fn = DecodeImagesFn(self.max_pixels, self.phash, self.pixel_hash)
        out = samples | "Decode" >> beam.ParDo(fn).with_outputs(CODES, FAILURES, main=INFOS)
        return {"infos": out[INFOS], "codes": out[CODES], "failures": out[FAILURES]}
