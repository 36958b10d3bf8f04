import io

import pytest

from tests.shardkit import jpeg_bytes, png_bytes
from transforms.decode import DecodeError, decode_image, pixel_digest

MAX = 64_000_000


def _png(mode: str, size=(20, 10), **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, **kw).save(buf, format="PNG")
    return buf.getvalue()


def test_jpeg_ok():
    img = decode_image(jpeg_bytes(1), "jpg", MAX)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_same_pixels_same_digest_across_formats():
    from PIL import Image

    png = png_bytes(3)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="BMP")
    assert pixel_digest(decode_image(png, "png", MAX)) == pixel_digest(decode_image(buf.getvalue(), "bmp", MAX))
    assert pixel_digest(decode_image(png, "png", MAX)) != pixel_digest(decode_image(png_bytes(4), "png", MAX))


@pytest.mark.parametrize(
    "mode, kw", [("RGBA", {"color": (10, 20, 30, 0)}), ("P", {}), ("L", {}), ("I;16", {}), ("1", {}), ("LA", {})]
)
def test_modes_become_rgb(mode, kw):
    img = decode_image(_png(mode, **kw), "png", MAX)
    assert img.mode == "RGB"
    if mode == "RGBA":  # fully transparent over white
        assert img.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), "jpg", MAX).mode == "RGB"


@pytest.mark.parametrize(
    "data, ext, error_type",
    [
        (jpeg_bytes(1)[:300], "jpg", "corrupt_image"),
        (b"not an image at all", "jpg", "unidentified_image"),
    ],
)
def test_bad_images(data, ext, error_type):
    with pytest.raises(DecodeError) as err:
        decode_image(data, ext, MAX)
    assert err.value.error_type == error_type


def test_decompression_bomb():
    bomb = _png("1", size=(9000, 9000))
    assert len(bomb) < 200_000
    with pytest.raises(DecodeError) as err:
        decode_image(bomb, "png", 50_000_000)
    assert err.value.error_type == "decompression_bomb"


EXPECTED_ODD = {
    "alpha_channel_image.png": None,
    "ukbench00120_gray.jpg": None,
    "ukbench09268_corrupt.jpg": "unidentified_image",
    "formats/Iggy.1024.ppm": None,
    "formats/baboon.pgm": None,
    "formats/copyleft.tiff": None,
    "formats/giphy.gif": None,
    "formats/marbles.pbm": None,
    "formats/ukbench09380.bmp": None,  # not BMP inside: decoded by content, the mismatch noted
    "formats/ukbench09380.jpeg": None,
    "formats/ukbench09380.png": None,
    "formats/ukbench09380.svg": None,  # JPEG bytes named .svg
    "formats/ukbench09380.webp": None,
}


@pytest.mark.parametrize("name, error_type", sorted(EXPECTED_ODD.items()))
def test_odd_images(shared_data, name, error_type):
    path = shared_data / "odd-images" / name
    data = path.read_bytes()
    ext = path.suffix.lstrip(".")
    if error_type is None:
        assert decode_image(data, ext, MAX).mode == "RGB"
    else:
        with pytest.raises(DecodeError) as err:
            decode_image(data, ext, MAX)
        assert err.value.error_type == error_type


@pytest.mark.parametrize(
    "fmt, ext, note",
    [
        ("WEBP", "jpg", "format_mismatch:webp_as_jpg"),
        ("PNG", "jpg", "format_mismatch:png_as_jpg"),
        ("JPEG", "png", "format_mismatch:jpeg_as_png"),
        ("JPEG", "jpg", None),
    ],
)
def test_decoded_by_content_mismatch_noted(fmt, ext, note):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(buf, format=fmt)
    notes: list[str] = []
    img = decode_image(buf.getvalue(), ext, MAX, notes)
    assert img.size == (30, 20) and img.mode == "RGB"
    assert notes == ([note] if note else [])


def test_exif_orientation_applied():
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    src = Image.new("RGB", (40, 20), (0, 0, 0))
    src.paste((255, 255, 255), (0, 0, 20, 20))  # white on the left half
    buf = io.BytesIO()
    src.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    notes: list[str] = []
    img = decode_image(buf.getvalue(), "jpg", MAX, notes)
    assert img.size == (20, 40) and notes == ["exif_orientation:6"]
    assert sum(img.getpixel((10, 5))) > 600 and sum(img.getpixel((10, 35))) < 100  # left went to the top


def _png16(width, height, color_type):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3}[color_type]
    z = zlib.compressobj()
    row = b"\0" * (1 + width * channels * 2)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_bit_depth_counts_against_the_decoded_limit():
    import resource

    bomb = _png16(8000, 8000, 2)  # 64 Mpx 16-bit RGB: 640 MB with its 8-bit copy
    assert len(bomb) < 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DecodeError) as err:
        decode_image(bomb, "png", MAX)
    assert err.value.error_type == "decompression_bomb" and "bytes decoded" in str(err.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: refused unread
    gray = decode_image(_png16(300, 200, 0), "png", MAX)  # 16-bit grayscale within the limit
    assert gray.mode == "RGB" and gray.size == (300, 200)
    with pytest.raises(DecodeError):
        decode_image(_png16(300, 200, 2), "png", MAX, max_decoded_bytes=300 * 200 * 9)
