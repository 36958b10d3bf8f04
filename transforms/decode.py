"""Decoding images: by content, not by name; decompression bombs, corrupt data, any mode to RGB,
EXIF orientation, and a digest of the decoded pixels (equal for the same picture in other
encodings).

``decode_image`` returns an RGB PIL image or raises ``DecodeError`` with a specific error
type. The format is what the bytes say: WebP or PNG bytes under a ``.jpg`` name (img2dataset's
``skip_reencode``) are a valid image, decoded and kept, with the mismatch recorded as a note.
Memory is bounded before any pixel is decoded: by the pixel count and by the decoded size in
bytes, which counts the bit depth (a 64 Mpx 16-bit RGB PNG is 384 MB decoded).
``transforms.process_shards`` runs it per sample.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging

log = logging.getLogger(__name__)

DECODE_VERSION = 2  # bump when decoded pixels change (cache keys include it)

# which PIL formats each member extension names; anything else is a noted mismatch
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
    "avif": {"AVIF"},
    "ico": {"ICO"},
    "psd": {"PSD"},
    "jp2": {"JPEG2000"},
}
# the formats memsieve decodes, whatever the member's name (PIL is told to try only these: no
# EPS through Ghostscript, no scientific formats)
DECODABLE_FORMATS = frozenset().union(*EXTENSION_FORMATS.values(), {"DIB", "PCX", "QOI"})
# member names that say "image" in a format memsieve may not decode: a specific error when not
UNSUPPORTED_EXTENSIONS = frozenset({"svg", "heic", "heif", "avif", "jxl", "ico", "psd", "raw", "cr2", "nef"})
DEFAULT_MAX_DECODED_BYTES = 512 * 1024 * 1024
_TRANSPOSE = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


class DecodeError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def decoded_bytes(img) -> int:
    """Bytes the decoded image holds, counting its bit depth, plus the 8-bit RGB copy made from
    it (unless it already is 8-bit RGB), from the header alone: 3 a pixel for 8-bit RGB, 10 for
    16-bit RGB, 6 for 16-bit grayscale, 8 for RGBA."""
    width, height = img.size
    bands = len(img.getbands())
    rawmode = ""
    if img.tile:
        args = img.tile[0][3]
        rawmode = args if isinstance(args, str) else str(args[0]) if isinstance(args, tuple) and args else ""
    if img.mode in ("I", "F"):
        sample_bytes = 4
    elif img.mode.startswith("I;16") or ";16" in rawmode:
        sample_bytes = 2
    else:
        sample_bytes = 1
    source = bands * sample_bytes
    rgb = 0 if (img.mode == "RGB" and sample_bytes == 1) else 4  # PIL holds RGB in 4 bytes a pixel
    return width * height * (source + rgb)


def _gray16_to_l(img):
    """16/32-bit grayscale -> 8-bit L in row blocks (no float copy of the whole image)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)
    top = int(arr.max()) if arr.size else 0
    scale = 255.0 / 65535.0 if top > 255 else 1.0  # 16-bit samples -> 8-bit
    out = np.empty(arr.shape, dtype=np.uint8)
    step = max(1, (1 << 22) // max(1, arr.shape[1]))
    for a in range(0, arr.shape[0], step):
        block = arr[a : a + step].astype(np.float32) * scale
        out[a : a + step] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _to_rgb(img):
    """Any mode (palette, CMYK, 16-bit, alpha, grayscale) -> 8-bit RGB; alpha over white."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _gray16_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


_EXIF_INFO = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")  # where PIL's getexif looks


def _orientation(img) -> int:
    if not hasattr(img, "tag_v2") and not any(k in img.info for k in _EXIF_INFO):
        return 1  # no EXIF or XMP block: nothing to parse
    try:
        value = img.getexif().get(0x0112)
        return int(value) if value in _TRANSPOSE else 1
    except Exception:  # a broken EXIF block does not make the picture unusable
        return 1


@functools.cache
def _openers() -> tuple[str, ...]:
    """The PIL openers of DECODABLE_FORMATS that this Pillow has (MPO is opened by JPEG's)."""
    from PIL import Image

    Image.init()
    return tuple(f for f in sorted(DECODABLE_FORMATS) if f in Image.OPEN)


def decode_image(data: bytes, ext: str, max_pixels: int, notes: list[str] | None = None, max_decoded_bytes: int = 0):
    """Bytes -> RGB PIL image (EXIF orientation applied), or raise DecodeError.

    ``notes`` (when given) receives non-fatal findings: ``format_mismatch:<fmt>_as_<ext>`` and
    ``exif_orientation:<n>``. ``max_decoded_bytes`` 0 means the default (512 MiB).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    budget = max_decoded_bytes or DEFAULT_MAX_DECODED_BYTES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_openers())
            fmt = img.format or "?"
            allowed = EXTENSION_FORMATS.get(ext.lower())
            if allowed is not None and fmt not in allowed and notes is not None:
                notes.append(f"format_mismatch:{fmt.lower()}_as_{ext.lower()}")
            width, height = img.size
            if width <= 0 or height <= 0:
                raise DecodeError("bad_dimensions", f"{width}x{height}")
            if width * height > max_pixels:
                raise DecodeError("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
            cost = decoded_bytes(img)
            if cost > budget:
                msg = f"{width}x{height} {img.mode} needs {cost} bytes decoded, the limit is {budget}"
                raise DecodeError("decompression_bomb", msg)
            orientation = _orientation(img)
            img.load()
            rgb = _to_rgb(img)
            if orientation != 1:
                rgb = rgb.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation]))
                if notes is not None:
                    notes.append(f"exif_orientation:{orientation}")
            return rgb
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError as exc:
        if ext.lower() in UNSUPPORTED_EXTENSIONS:
            msg = f"the image member is .{ext.lower()}, which is not a supported raster format"
            raise DecodeError("unsupported_image_format", msg) from None
        raise DecodeError("unidentified_image", str(exc)) from None
    except MemoryError:
        raise DecodeError("decompression_bomb", "out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as exc:
        raise DecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def pixel_digest(img) -> str:
    """sha256 over the RGB pixels and the size: equal for the same picture in other encodings.

    Hashed in row blocks, so a large image is not copied whole."""
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    step = max(1, (1 << 22) // max(1, img.width * 3))
    for top in range(0, img.height, step):
        h.update(img.crop((0, top, img.width, min(img.height, top + step))).tobytes())
    return h.hexdigest()
