"""Fault cases for the reader fixes of issue 11 (used by ``make_fault_shards``): repeated and
link-only keys, ``./`` members, members per key, tars cut inside a member's data, on a block
boundary and inside a header, a corrupt header, a gzip tar named .tar, a FIFO, integer sidecar keys,
shard names that sanitise alike."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile


def _tar_bytes(build) -> tuple[bytes, list[int]]:
    """Run ``build(tar, marks)`` on an in-memory tar; -> (bytes, the offsets it marked)."""
    buf = io.BytesIO()
    marks: list[int] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        build(tar, marks)
    return buf.getvalue(), marks


def member_cases(s, img, add, sample) -> None:
    with s.tar("32000") as tar:
        sample(tar, "32000000", img("JPEG", seed=70), caption=b"the first caption")
        sample(tar, "32000000", img("JPEG", seed=71), caption=b"the second caption")
        s.case(
            "adjacent repeated key (the second picture must not take the first caption)",
            "32000",
            "32000000",
            "ok",
            also_failure="duplicate_key",
            caption="the first caption",
        )
        add(tar, "32000001.jpg", kind=tarfile.SYMTYPE, link="/etc/hostname")
        add(tar, "32000001.txt", kind=tarfile.SYMTYPE, link="/etc/hostname")
        s.case("link-only key (every member a symlink)", "32000", "32000001", "failed:link_member")
        for ext, data in (("jpg", img("JPEG", seed=72)), ("txt", b"dot-slash caption"), ("json", b"{}")):
            add(tar, f"./32000002.{ext}", data)
        s.case("./-prefixed members (tar -C dir .)", "32000", "32000002", "ok")
        sample(tar, "32000003", img("JPEG", seed=73))
        for i in range(100):
            add(tar, f"32000003.extra{i}", b"x")
        s.case("100 members under one key (read limit 64)", "32000", "32000003", "failed:too_many_members")
        sample(tar, "32000004", img("JPEG", seed=74))
        add(tar, "32000004.seg.png", img("PNG", seed=75))
        add(tar, "32000004.npy", b"\x93NUMPY" + b"\0" * 100)
        s.case("unknown members beside the image (.seg.png, .npy)", "32000", "32000004", "ok")


def _cut_shard(s, img, sample, shard: str, name: str, cut_at) -> list[str]:
    keys = [f"{shard}{i:03d}" for i in range(4)]

    def build(tar, marks):
        for i, key in enumerate(keys):
            marks.append(tar.offset)
            sample(tar, key, img("JPEG", size=(160, 120), seed=200 + i))

    data, marks = _tar_bytes(build)
    with open(os.path.join(s.out, f"{shard}.tar"), "wb") as f:
        f.write(data[: cut_at(data, marks)])
    s.sidecar(f"{shard}.parquet", [{"key": k, "status": "success"} for k in keys])
    return keys


def shard_cases(s, img, add, sample) -> None:
    # cut 700 bytes into the third sample's image data: its header was read, its key must count
    keys = _cut_shard(s, img, sample, "43000", "member", lambda d, m: m[2] + 512 + 700)
    for key, expect in zip(keys, ("ok", "ok", "failed:truncated_member", "failed:truncated_tar"), strict=True):
        s.case("tar cut inside a member's data", "43000", key, expect)
    s.case("tar cut inside a member's data: shard event", "43000", None, "event:truncated_tar")
    keys = _cut_shard(s, img, sample, "43001", "boundary", lambda d, m: m[2])
    for key, expect in zip(keys, ("ok", "ok", "failed:truncated_tar", "failed:truncated_tar"), strict=True):
        s.case("tar cut on a block boundary (no end-of-archive blocks)", "43001", key, expect)
    s.case("tar cut on a block boundary: shard event", "43001", None, "event:truncated_tar")
    keys = _cut_shard(s, img, sample, "43002", "header", lambda d, m: m[2] + 100)
    for key, expect in zip(keys, ("ok", "ok", "failed:truncated_tar", "failed:truncated_tar"), strict=True):
        s.case("tar cut inside a header", "43002", key, expect)

    def garbage(tar, marks):
        sample(tar, "43003000", img("JPEG", seed=210))
        tar.fileobj.write(bytes(range(1, 256)) * 2 + b"\x01\x02")  # 512 bytes that are no header
        tar.offset += 512

    data, _ = _tar_bytes(garbage)
    with open(os.path.join(s.out, "43003.tar"), "wb") as f:
        f.write(data)
    s.case("a corrupt header after a good sample: the sample", "43003", "43003000", "ok")
    s.case("a corrupt header after a good sample: shard event", "43003", None, "event:truncated_tar")

    def three(tar, marks):
        for i in range(3):
            sample(tar, f"43004{i:03d}", img("JPEG", seed=220 + i))

    data, _ = _tar_bytes(three)
    with open(os.path.join(s.out, "43004.tar"), "wb") as f:
        f.write(gzip.compress(data, mtime=0))
    for i in range(3):
        s.case("a gzip-compressed tar named .tar", "43004", f"43004{i:03d}", "ok")
    if hasattr(os, "mkfifo"):
        os.mkfifo(os.path.join(s.out, "43005.tar"))  # opening it would block the run forever
        s.case(
            "a FIFO named .tar (never opened: skipped at listing or unreadable)",
            "43005",
            None,
            "event:unreadable_shard|event:skipped_at_listing",
        )


def sidecar_and_identity_cases(s, img, sample) -> None:
    with s.tar("44000") as tar:
        for i in range(3):
            sample(tar, f"0440000{i:02d}", img("JPEG", seed=230 + i))
    rows = [{"key": 44000000 + i, "status": "success", "original_width": 640, "original_height": 480} for i in range(3)]
    rows.append({"key": 44000003, "status": "failed_to_download", "error_message": "HTTP Error 404"})
    s.sidecar("44000.parquet", rows, caption=False)
    for i in range(3):
        s.case("integer keys in the sidecar, zero-padded keys in the tar", "44000", f"0440000{i:02d}", "ok")
    s.case("integer key of a failed download, reported zero-padded", "44000", "044000003", "failed:failed_to_download")
    for shard, keys in (("web 1", ("45000000", "45000002")), ("web_1", ("45000001", "45000002"))):
        with s.tar(shard) as tar:
            for key in keys:
                sample(tar, key, img("JPEG", seed=int(key) % 1000 + (0 if shard == "web 1" else 7)))
    s.case("shards whose names sanitise alike (web 1.tar)", "web 1", "45000000", "ok")
    s.case("shards whose names sanitise alike (web_1.tar)", "web_1", "45000001", "ok")
    s.case("a key in both shards that sanitise alike", "web 1", "45000002", "ok", also_failure="duplicate_key")


def text_rows() -> list[tuple[str, dict, str]]:
    return [
        (
            "caption only in the json, 100 kB (limits hold on every path)",
            {"caption": None, "meta": json.dumps({"caption": "x" * 100_000}).encode()},
            "failed:caption_too_long",
        ),
        ("json that is not UTF-8", {"meta": b'{"url": "caf\xe9"}'}, "failed:invalid_json"),
        ("json over read limit (2 MB)", {"meta": b'{"pad": "' + b"y" * 2_000_000 + b'"}'}, "failed:invalid_json"),
        (
            "url with a newline and an escape sequence",
            {"meta": json.dumps({"url": "http://x.invalid/a\nb\x1b[31m"}).encode()},
            "ok",
        ),
    ]
