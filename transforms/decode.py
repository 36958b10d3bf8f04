"""Decoding images: format vs. file name, decompression bombs, corrupt data, any mode to RGB,
and a digest of the decoded pixels (equal for the same picture in other encodings).

``decode_image`` returns an RGB PIL image or raises ``DecodeError`` with a specific error
type; ``transforms.process_shards`` runs it per sample.
"""

from __future__ import annotations

import hashlib
import io
import logging

log = logging.getLogger(__name__)

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
