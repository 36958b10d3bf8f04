"""Adversarial shards for the fault suite, each case with its expected outcome.

    python scripts/make_fault_shards.py OUT_DIR     # writes OUT_DIR/*.tar (+ sidecars) and OUT_DIR/cases.json

Also importable: ``make_fault_suite(out, seed)`` builds the shards and returns the cases;
``account(cases, run_dir)`` checks a finished run against them (``tests/test_faults.py`` uses
both; ``scripts/fault_cases_reader.py`` holds the cases of the reader fixes). A case is one of:

- a key with ``expect`` ``ok`` or ``failed:<error_type>`` (``ok|failed:truncated_tar`` for keys
  of a truncated shard), optionally ``also_failure``: an error type that must also be recorded,
  and ``caption``: the caption the manifest must hold;
- a shard-level case (``key`` None) with ``expect`` ``event:<prefix>``: that event in ``shards/``.

Run the shards with ``JOB_YAML`` (it sets the limits some cases rely on).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import sys
import tarfile
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_cases_reader as more  # noqa: E402

# the job the suite is run with: a lower image-size limit, so one case needs only 2.5 MB
JOB_YAML = """name: faults
input: {path: unused}
output: {report: true, filtered_shards: true}
read: {max_image_bytes: 2000000, max_members_per_key: 64, max_json_bytes: 1000000}
run: {max_failure_ratio: 0.9}
"""


def _img(fmt: str, mode: str = "RGB", size=(64, 48), seed: int = 0, **save) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    elif mode == "F":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
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


def _bilevel_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(width: int, height: int, color_type: int) -> bytes:
    """A valid 16-bit PNG of zeros, compressed row by row (never held whole in memory)."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    row = b"\0" * (1 + width * channels * 2)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(63).random((30, 80, 3)) * 255).astype("uint8")).save(
        buf, format="JPEG", exif=exif.tobytes()
    )
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries a few bytes: the bomb must be refused unread."""

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def _add(tar, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 0
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.linkname = link
        tar.addfile(info)


def _sample(tar, key: str, image: bytes | None, ext="jpg", caption: bytes | None = b"a caption", meta=None) -> None:
    if image is not None:
        _add(tar, f"{key}.{ext}", image)
    if caption is not None:
        _add(tar, f"{key}.txt", caption)
    _add(tar, f"{key}.json", meta if meta is not None else json.dumps({"url": f"http://x.invalid/{key}"}).encode())


class _Suite:
    def __init__(self, out: str, seed: int):
        self.out, self.rng, self.cases = out, random.Random(seed), []

    def case(self, name: str, shard: str, key: str | None, expect: str, **extra) -> None:
        self.cases.append(dict({"case": name, "shard": shard, "key": key, "expect": expect}, **extra))

    def tar(self, shard: str, fmt=tarfile.GNU_FORMAT, **kw):
        return tarfile.open(os.path.join(self.out, f"{shard}.tar"), "w", format=fmt, **kw)

    def sidecar(self, name: str, rows: list[dict], caption: bool = True) -> None:
        _sidecar(os.path.join(self.out, name), rows, caption)


def _image_cases(s: _Suite) -> None:
    jpeg = _img("JPEG", seed=1)
    rows = [
        ("good jpeg", jpeg, "jpg", "ok"),
        ("corrupt jpeg (cut in half)", jpeg[: len(jpeg) // 2], "jpg", "failed:corrupt_image"),
        ("corrupt png (header only)", _img("PNG")[:60], "png", "failed:corrupt_image"),
        ("zero-byte image member", b"", "jpg", "failed:empty_image"),
        ("decompression bomb png (16000x16000)", _bilevel_png(16000), "png", "failed:decompression_bomb"),
        (
            "huge dimensions (9000x9000, over read.max_image_pixels)",
            _bilevel_png(9000),
            "png",
            "failed:decompression_bomb",
        ),
        (
            "huge dimensions in a 100-byte png header",
            _png_header_only(100_000, 100_000),
            "png",
            "failed:decompression_bomb",
        ),
        ("cmyk jpeg", _img("JPEG", "CMYK", seed=2), "jpg", "ok"),
        ("16-bit grayscale png", _img("PNG", "I;16", seed=3), "png", "ok"),
        ("32-bit float tiff", _img("TIFF", "F", seed=3), "tiff", "ok"),
        ("palette png", _img("PNG", "P", seed=4), "png", "ok"),
        ("alpha png", _img("PNG", "RGBA", seed=5), "png", "ok"),
        ("grayscale+alpha png", _img("PNG", "LA", seed=5), "png", "ok"),
        ("animated gif", _animated_gif(), "gif", "ok"),
        ("jpeg bytes under .png (kept, mismatch noted)", _img("JPEG", seed=6), "png", "ok"),
        ("webp bytes under .jpg (img2dataset skip_reencode)", _img("WEBP", seed=61), "jpg", "ok"),
        ("png bytes under .jpg", _img("PNG", seed=62), "jpg", "ok"),
        ("gif bytes under .webp", _animated_gif(), "webp", "ok"),
        ("avif image (.avif)", _img("AVIF", seed=64), "avif", "ok"),
        ("avif bytes under .jpg", _img("AVIF", seed=65), "jpg", "ok"),
        (
            "eps under .jpg (never handed to Ghostscript)",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "jpg",
            "failed:unidentified_image",
        ),
        ("16-bit rgb png", _png16(64, 48, 2), "png", "ok"),
        ("64 Mpx 16-bit rgb png (8000x8000, a 100 kB file)", _png16(8000, 8000, 2), "png", "failed:decompression_bomb"),
        ("exif-rotated jpeg (orientation 6)", _exif_rotated(), "jpg", "ok"),
        ("random bytes as image", bytes(s.rng.getrandbits(8) for _ in range(500)), "jpg", "failed:unidentified_image"),
        ("image over read.max_image_bytes", _img("PNG", size=(1000, 900), seed=7), "png", "failed:image_too_large"),
        ("svg image member", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "svg", "failed:unsupported_image_format"),
    ]
    with s.tar("10000") as tar:
        for i, (name, image, ext, expect) in enumerate(rows):
            key = f"100000{i:02d}"
            _sample(tar, key, image, ext)
            s.case(name, "10000", key, expect)


def _text_cases(s: _Suite) -> None:
    jpg = _img("JPEG", seed=8)
    rows = [
        ("non-UTF-8 caption", {"caption": "café".encode("latin-1")}, "failed:bad_caption_encoding"),
        ("1 MB caption", {"caption": b"x" * 1_000_000}, "failed:caption_too_long"),
        ("missing caption", {"caption": None}, "failed:missing_caption"),
        ("caption only in the json", {"caption": None, "meta": b'{"caption": "from json"}'}, "ok"),
        ("invalid json", {"meta": b"{not json"}, "failed:invalid_json"),
        ("json that is a list", {"meta": b"[1, 2]"}, "failed:invalid_json"),
        ("json nesting bomb (100k levels)", {"meta": b"[" * 100_000 + b"]" * 100_000}, "failed:invalid_json"),
        ("json with a lone surrogate", {"meta": b'{"url": "http://x/\\ud800"}'}, "failed:invalid_json"),
        ("json with odd but valid values", {"meta": b'{"url": 7, "objects": "flag", "caption": []}'}, "ok"),
        *more.text_rows(),
    ]
    with s.tar("20000") as tar:
        for i, (name, kw, expect) in enumerate(rows):
            key = f"200000{i:02d}"
            _sample(tar, key, jpg, **kw)
            s.case(name, "20000", key, expect)


def _member_cases(s: _Suite) -> None:
    with s.tar("30000", encoding="latin-1") as tar:
        _sample(tar, "30000000", None, caption=b"caption without an image")
        s.case("missing image", "30000", "30000000", "failed:missing_image")
        _add(tar, "../../escape/30000001.jpg", _img("JPEG", seed=11))
        _add(tar, "../../escape/30000001.txt", b"path traversal")
        s.case("../ member name", "30000", "../../escape/30000001", "failed:unsafe_member_name")
        _add(tar, "/abs/30000002.jpg", _img("JPEG", seed=12))
        s.case("absolute member name", "30000", "/abs/30000002", "failed:unsafe_member_name")
        _add(tar, "somedir", kind=tarfile.DIRTYPE)
        s.case("directory member", "30000", None, "event:skipped_non_file_member")
        _add(tar, "30000003.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        s.case("symlink member (to /etc/passwd)", "30000", "30000003", "failed:link_member")
        _add(tar, "30000004.jpg", kind=tarfile.LNKTYPE, link="30000005.jpg")
        _add(tar, "30000004.txt", b"hard-linked image")
        s.case("hard link member", "30000", "30000004", "failed:link_member")
        _sample(tar, "30000005", _img("JPEG", seed=13))
        s.case("good sample after the links", "30000", "30000005", "ok")
        _sample(tar, "30000006", _img("JPEG", seed=14))
        _sample(tar, "30000006", _img("JPEG", seed=15))
        s.case("duplicate key within a shard (first kept)", "30000", "30000006", "ok", also_failure="duplicate_key")
        _add(tar, ".jpg", _img("JPEG", seed=16))
        s.case("member without a key (.jpg)", "30000", None, "event:unrecognized_member")
        _sample(tar, "caf\xe9", _img("JPEG", seed=17))  # latin-1 bytes in the tar header
        s.case("non-UTF-8 member name", "30000", "caf\\xe9", "failed:bad_member_name_encoding")
        long_key = "k" * 250
        _sample(tar, long_key, _img("JPEG", seed=18))
        s.case("250-character key", "30000", long_key, "ok")
        _sample(tar, "31000000", _img("JPEG", seed=19))
        s.case(
            "duplicate key across shards (first shard kept)", "30000", "31000000", "ok", also_failure="duplicate_key"
        )
    with s.tar("31000") as tar:
        _sample(tar, "31000000", _img("JPEG", seed=20))
        _sample(tar, "31000001", _img("JPEG", seed=21))
        s.case("good sample beside a cross-shard duplicate", "31000", "31000001", "ok")


def _truncated(s: _Suite, shard: str, n: int, cut_range: tuple[float, float], compress: bool, name: str) -> None:
    keys = [f"{shard}{i:03d}" for i in range(n)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i, key in enumerate(keys):
            _sample(tar, key, _img("JPEG", size=(128, 96), seed=100 + i))
    data = gzip.compress(buf.getvalue(), mtime=0) if compress else buf.getvalue()
    cut = s.rng.randint(int(len(data) * cut_range[0]), int(len(data) * cut_range[1]))
    with open(os.path.join(s.out, f"{shard}.tar"), "wb") as f:
        f.write(data[:cut])
    _sidecar(os.path.join(s.out, f"{shard}.parquet"), [{"key": k, "status": "success"} for k in keys])
    for key in keys:
        s.case(
            f"{name}, cut at byte {cut} of {len(data)}", shard, key, "ok|failed:truncated_tar|failed:truncated_member"
        )
    s.case(f"{name}: shard event", shard, None, "event:truncated_tar")


def _shard_cases(s: _Suite) -> None:
    _truncated(s, "40000", 8, (0.05, 0.5), False, "truncated tar (random offset)")
    _truncated(s, "40001", 8, (0.5, 0.95), False, "truncated tar (random offset, late)")
    _truncated(s, "40002", 8, (0.2, 0.8), True, "truncated gzip tar (random offset)")
    open(os.path.join(s.out, "41000.tar"), "wb").close()
    s.case("empty shard (0 bytes)", "41000", None, "event:truncated_tar")
    with s.tar("41001"):
        pass
    s.case("empty shard (a valid tar with no members)", "41001", None, "event:empty_shard")
    with open(os.path.join(s.out, "41002.tar"), "wb") as f:
        f.write(b"this is not a tar file at all" * 40)
    s.case("a text file named .tar", "41002", None, "event:truncated_tar")
    with open(os.path.join(os.fsencode(s.out), b"4200\xe9.tar"), "wb") as f:  # a file name that is not UTF-8
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            _sample(tar, "42000000", _img("JPEG", seed=42))
    s.case("shard file name that is not UTF-8", "4200\\xe9", "42000000", "ok")


def _sidecar_cases(s: _Suite) -> None:
    with s.tar("50000") as tar:
        for i in range(3):
            _sample(tar, f"5000000{i}", _img("JPEG", seed=50 + i), caption=b"the tar's caption")
    rows = [
        {"key": "50000000", "status": "success"},
        {"key": "50000001", "status": "failed_to_download", "error_message": "HTTP Error 404"},
        {"key": "50000002", "status": "success", "caption": "a different caption"},
        {"key": "50000003", "status": "success"},
        {"key": "50000004", "status": "failed_to_download", "error_message": "HTTP Error 404"},
        {"key": "50000004", "status": "failed_to_download", "error_message": "repeated row"},
    ]
    _sidecar(os.path.join(s.out, "50000.parquet"), rows)
    s.case("tar sample listed as success in the sidecar", "50000", "50000000", "ok")
    s.case("mismatched sidecar: tar sample listed as failed (the tar wins)", "50000", "50000001", "ok")
    s.case("mismatched sidecar: another caption (the tar wins)", "50000", "50000002", "ok")
    s.case("mismatched sidecar: success row absent from the tar", "50000", "50000003", "failed:missing_from_shard")
    s.case("failed download in the sidecar (row repeated)", "50000", "50000004", "failed:failed_to_download")
    with s.tar("50001") as tar:
        _sample(tar, "50001000", _img("JPEG", seed=55))
    with open(os.path.join(s.out, "50001.parquet"), "wb") as f:
        f.write(b"PAR1 this is not parquet")
    s.case("corrupt sidecar (the tar's samples survive)", "50001", "50001000", "ok")
    s.case("corrupt sidecar: shard event", "50001", None, "event:bad_sidecar")
    with s.tar("50002") as tar:
        _sample(tar, "50002000", _img("JPEG", seed=56))
    s.case("missing sidecar", "50002", "50002000", "ok")


def make_fault_suite(out: str, seed: int = 0) -> list[dict]:
    """Write the adversarial shards to ``out``; returns (and writes ``cases.json``) the cases."""
    os.makedirs(out, exist_ok=True)
    suite = _Suite(out, seed)
    for build in (_image_cases, _text_cases, _member_cases, _shard_cases, _sidecar_cases):
        build(suite)
    more.member_cases(suite, _img, _add, _sample)
    more.shard_cases(suite, _img, _add, _sample)
    more.sidecar_and_identity_cases(suite, _img, _sample)
    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(suite.cases, f, indent=1)
    return suite.cases


def _outcome_ok(case: dict, row: dict, failed_types: set[str]) -> bool:
    options = case["expect"].split("|")
    if row["status"] == "ok":
        good = "ok" in options
    else:
        good = any(f"failed:{t}" in options for t in failed_types)
    if case.get("caption") is not None and row.get("caption") != case["caption"]:
        return False
    return good and (not case.get("also_failure") or case["also_failure"] in failed_types)


def account(cases: list[dict], run_dir: str) -> dict:
    """Check a finished run against the cases. -> {"rows": [(case, tried, survived, lost)], totals,
    "unexpected_keys": manifest keys no case names, "repeated_keys": keys with several manifest rows}."""
    from collections import Counter

    from transforms.write import read_table

    manifest_rows = read_table(os.path.join(run_dir, "manifest")).to_pylist()
    manifest = {r["key"]: r for r in manifest_rows}
    failed: dict[str, set[str]] = {}
    for r in read_table(os.path.join(run_dir, "failures")).to_pylist():
        failed.setdefault(r["key"], set()).add(r["error_type"])
    events = {  # by file name: a shard's identity in the tables also hashes its full path
        os.path.basename(r["path"])[:-4]: list(r["events"] or [])
        for r in read_table(os.path.join(run_dir, "shards")).to_pylist()
    }
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:  # files the listing skipped
        skipped = (json.load(f).get("input", {}).get("skipped") or {}).get("files") or {}
    for path, why in skipped.items():  # named as skipped counts as accounted for
        events.setdefault(os.path.basename(path)[:-4], []).append(f"skipped_at_listing:{why}")
    rows: dict[str, list[int]] = {}
    for case in cases:
        tally = rows.setdefault(case["case"], [0, 0, 0])
        tally[0] += 1
        if case["key"] is None:
            prefixes = [e.split(":", 1)[1] for e in case["expect"].split("|")]
            tally[1] += any(e.startswith(tuple(prefixes)) for e in events.get(case["shard"], []))
            tally[2] += case["shard"] not in events
        elif case["key"] not in manifest:
            tally[2] += 1
        else:
            tally[1] += _outcome_ok(case, manifest[case["key"]], failed.get(case["key"], set()))
    named = {c["key"] for c in cases if c["key"] is not None}
    result = {
        "rows": [(name, *t) for name, t in rows.items()],
        "unexpected_keys": sorted(set(manifest) - named),
        "repeated_keys": sorted(k for k, n in Counter(r["key"] for r in manifest_rows).items() if n > 1),
    }
    for i, total in enumerate(("tried", "survived", "lost"), start=1):
        result[total] = sum(r[i] for r in result["rows"])
    return result


def format_table(result: dict) -> str:
    """The closing-note table: one line per case (keys tried, survived, lost) and the totals."""
    lines = [f"{'case':68s} {'tried':>5s} {'survived':>8s} {'lost':>4s}"]
    for name, tried, survived, lost in result["rows"]:
        lines.append(f"{name[:68]:68s} {tried:5d} {survived:8d} {lost:4d}")
    lines.append(f"{'total':68s} {result['tried']:5d} {result['survived']:8d} {result['lost']:4d}")
    return "\n".join(lines)


def _sidecar(path: str, rows: list[dict], caption: bool = True) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for r in rows:
        r.setdefault("url", f"http://x.invalid/{r['key']}")
        r.setdefault("error_message", None)
        if caption:
            r.setdefault("caption", "a caption")
    pq.write_table(pa.Table.from_pylist(rows), path)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "out/faults"
    print(f"{len(make_fault_suite(target))} cases -> {target}")
