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
        (jpeg_bytes(1), "png", "format_mismatch"),
        (png_bytes(1), "jpg", "format_mismatch"),
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
    "formats/ukbench09380.bmp": "format_mismatch",
    "formats/ukbench09380.jpeg": None,
    "formats/ukbench09380.png": "format_mismatch",
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
