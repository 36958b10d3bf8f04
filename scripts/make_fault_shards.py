"""Adversarial shards for the fault suite, each case with its expected outcome.

    python scripts/make_fault_shards.py OUT_DIR     # writes OUT_DIR/*.tar (+ sidecars) and OUT_DIR/cases.json

Cases: truncated tars, corrupt JPEG/PNG, zero-byte members, decompression bombs and huge
dimensions, CMYK / 16-bit / palette / alpha / animated images, non-UTF-8 and 1 MB captions,
invalid JSON, duplicate keys within and across shards, ``../`` and absolute member names,
directories / symlinks / hard links inside a tar, empty shards, missing and mismatched
parquet sidecars. Expected outcome per key: ``ok`` or ``failed:<error_type>``.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile

import numpy as np
from PIL import Image


def _img_bytes(fmt: str, mode: str = "RGB", size=(64, 48), seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (32, 32), i * 40) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (16000, 16000)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name: str, data: bytes, kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 0
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.linkname = link
        tar.addfile(info)


def _sample(
    tar,
    key: str,
    image: bytes | None,
    ext: str = "jpg",
    caption: bytes | None = b"a caption",
    meta: bytes | None = None,
) -> None:
    if image is not None:
        _add(tar, f"{key}.{ext}", image)
    if caption is not None:
        _add(tar, f"{key}.txt", caption)
    _add(
        tar,
        f"{key}.json",
        meta if meta is not None else json.dumps({"key": key, "url": f"http://x.invalid/{key}"}).encode(),
    )


def make_fault_suite(out: str, seed: int = 0) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    jpeg = _img_bytes("JPEG", seed=1)
    cases: list[dict] = []

    def case(name, key, expect):
        cases.append({"case": name, "key": key, "expect": expect})

    with tarfile.open(os.path.join(out, "10000.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        for name, key, image, ext, expect in [
            ("good jpeg", "10000000", jpeg, "jpg", "ok"),
            ("corrupt jpeg", "10000001", jpeg[: len(jpeg) // 2], "jpg", "failed:corrupt_image"),
            ("corrupt png", "10000002", _img_bytes("PNG")[:60], "png", "failed:corrupt_image"),
            ("zero-byte image", "10000003", b"", "jpg", "failed:empty_image"),
            ("decompression bomb png", "10000004", _huge_png(), "png", "failed:decompression_bomb"),
            ("cmyk jpeg", "10000005", _img_bytes("JPEG", "CMYK", seed=2), "jpg", "ok"),
            ("16-bit png", "10000006", _img_bytes("PNG", "I;16", seed=3), "png", "ok"),
            ("palette png", "10000007", _img_bytes("PNG", "P", seed=4), "png", "ok"),
            ("alpha png", "10000008", _img_bytes("PNG", "RGBA", seed=5), "png", "ok"),
            ("animated gif", "10000009", _animated_gif(), "gif", "ok"),
            ("jpeg bytes under .png", "10000010", _img_bytes("JPEG", seed=6), "png", "failed:format_mismatch"),
            (
                "random bytes as image",
                "10000011",
                bytes(rng.getrandbits(8) for _ in range(500)),
                "jpg",
                "failed:unidentified_image",
            ),
        ]:
            _sample(tar, key, image, ext)
            case(name, key, expect)
        _sample(tar, "10000012", _img_bytes("JPEG", seed=7), caption="café".encode("latin-1"))
        case("non-UTF-8 caption", "10000012", "failed:bad_caption_encoding")
        _sample(tar, "10000013", _img_bytes("JPEG", seed=8), caption=b"x" * 1_000_000)
        case("1 MB caption", "10000013", "failed:caption_too_long")
        _sample(tar, "10000014", _img_bytes("JPEG", seed=9), meta=b"{not json")
        case("invalid json", "10000014", "failed:invalid_json")
        _sample(tar, "10000015", _img_bytes("JPEG", seed=10), caption=None)
        case("missing caption", "10000015", "failed:missing_caption")
        _sample(tar, "10000016", None, caption=b"caption without an image")
        case("missing image", "10000016", "failed:missing_image")
        _add(tar, "../../escape/10000017.jpg", _img_bytes("JPEG", seed=11))
        _add(tar, "../../escape/10000017.txt", b"path traversal")
        case("../ member name", "../../escape/10000017", "failed:unsafe_member_name")
        _add(tar, "/abs/10000018.jpg", _img_bytes("JPEG", seed=12))
        case("absolute member name", "/abs/10000018", "failed:unsafe_member_name")
        _add(tar, "somedir", b"", kind=tarfile.DIRTYPE)
        _add(tar, "10000019.jpg", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "10000020.jpg", b"", kind=tarfile.LNKTYPE, link="10000000.jpg")
        _sample(tar, "10000021", _img_bytes("JPEG", seed=13))
        case("good after links", "10000021", "ok")
        _sample(tar, "10000000", _img_bytes("JPEG", seed=14))  # repeats the first key, later in the shard
        case("duplicate key within shard (first kept)", "10000000", "ok")
        _sample(tar, "20000000", _img_bytes("JPEG", seed=15))
        case("duplicate key across shards (first shard kept)", "20000000", "ok")
    with tarfile.open(os.path.join(out, "10001.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        _sample(tar, "20000000", _img_bytes("JPEG", seed=16))
        for i in range(1, 9):
            _sample(tar, f"2000000{i}", _img_bytes("JPEG", seed=20 + i, size=(256, 192)))
    data = open(os.path.join(out, "10001.tar"), "rb").read()
    cut = rng.randint(len(data) // 3, len(data) // 2)
    with open(os.path.join(out, "10001.tar"), "wb") as f:
        f.write(data[:cut])
    _sidecar(
        os.path.join(out, "10001.parquet"),
        [{"key": f"2000000{i}", "status": "success"} for i in range(9)]
        + [{"key": "20000099", "status": "failed_to_download", "error_message": "HTTP Error 404"}],
    )
    cases.append(
        {"case": "truncated tar (random offset)", "key": "20000001..20000008", "expect": "ok-or-failed:truncated_tar"}
    )
    case("failed download in sidecar", "20000099", "failed:failed_to_download")
    open(os.path.join(out, "10002.tar"), "wb").close()  # an empty (0-byte) shard
    cases.append({"case": "empty shard (0 bytes)", "key": "", "expect": "event"})
    with tarfile.open(os.path.join(out, "10003.tar"), "w"):
        pass  # a valid tar with no members
    cases.append({"case": "empty shard (no members)", "key": "", "expect": "event"})
    with tarfile.open(os.path.join(out, "10004.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        _sample(tar, "40000000", _img_bytes("JPEG", seed=40))
        _sample(tar, "40000001", _img_bytes("JPEG", seed=41))
    _sidecar(
        os.path.join(out, "10004.parquet"),
        [{"key": "40000000", "status": "success"}, {"key": "40000002", "status": "success"}],
    )
    case("sidecar row absent from the tar (mismatched sidecar)", "40000002", "failed:missing_from_shard")
    case("tar sample absent from the sidecar", "40000001", "ok")
    with tarfile.open(os.path.join(out, "10005.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        _sample(tar, "50000000", _img_bytes("JPEG", seed=50))
    with open(os.path.join(out, "10005.parquet"), "wb") as f:
        f.write(b"PAR1 this is not parquet")
    case("corrupt sidecar", "50000000", "ok")
    with tarfile.open(os.path.join(out, "10006.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        _sample(tar, "60000000", _img_bytes("JPEG", seed=60))
    case("missing sidecar", "60000000", "ok")
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    return cases


def _sidecar(path: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for r in rows:
        r.setdefault("url", f"http://x.invalid/{r['key']}")
        r.setdefault("error_message", None)
    pq.write_table(pa.Table.from_pylist(rows), path)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "out/faults"
    print(f"{len(make_fault_suite(target))} cases -> {target}")
