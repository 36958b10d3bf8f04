import io
import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.elements import Failure, Sample
from tests.shardkit import jpeg_bytes, sample, write_shard, write_sidecar
from transforms.read_shards import ReadLimits, ReadShards, build_sample, iter_shard, shard_name, split_member_name


def test_split_member_name():
    assert split_member_name("00001.jpg") == ("00001", "jpg")
    assert split_member_name("a/b/00001.seg.png") == ("a/b/00001", "seg.png")
    assert split_member_name("README") is None


@pytest.mark.parametrize(
    "members, error_type",
    [
        ({"txt": b"hi"}, "missing_image"),
        ({"jpg": b"", "txt": b"hi"}, "empty_image"),
        ({"jpg": b"x", "txt": b"\xff\xfe caf\xe9"}, "bad_caption_encoding"),
        ({"jpg": b"x", "txt": b"a" * 20000}, "caption_too_long"),
        ({"jpg": b"x"}, "missing_caption"),
        ({"jpg": b"x", "txt": b"  "}, "missing_caption"),
        ({"jpg": b"x", "txt": b"ok", "json": b"{not json"}, "invalid_json"),
        ({"jpg": b"x", "txt": b"ok", "json": b"[1, 2]"}, "invalid_json"),
    ],
)
def test_build_sample_failures(members, error_type):
    result = build_sample("k", "s", members, ReadLimits())
    assert isinstance(result, Failure)
    assert result.error_type == error_type


def test_build_sample_ok():
    result = build_sample("k", "s", {"jpg": b"abc", "txt": b" a cat ", "json": b'{"url": "u"}'}, ReadLimits())
    assert isinstance(result, Sample)
    assert (result.caption, result.url, result.image_ext) == ("a cat", "u", "jpg")
    assert result.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sidecar_failed_downloads_and_missing(tmp_path):
    shard = write_shard(str(tmp_path / "00000.tar"), [sample("0001"), sample("0002")])
    write_sidecar(
        str(tmp_path / "00000.parquet"),
        [
            {"key": "0001", "status": "success", "url": "u1", "error_message": None},
            {"key": "0002", "status": "success", "url": "u2", "error_message": None},
            {"key": "0003", "status": "failed_to_download", "url": "u3", "error_message": "404"},
            {"key": "0004", "status": "success", "url": "u4", "error_message": None},
        ],
    )
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create([shard]) | ReadShards(ReadLimits())
        assert_that(out["samples"] | "SK" >> beam.Map(lambda s: s.key), equal_to(["0001", "0002"]), label="s")
        assert_that(
            out["failures"] | "FK" >> beam.Map(lambda f: (f.key, f.stage, f.error_type)),
            equal_to([("0003", "download", "failed_to_download"), ("0004", "read", "missing_from_shard")]),
            label="f",
        )


def test_truncated_tar_keeps_what_came_before(tmp_path):
    samples = [sample(f"{i:04d}", image=jpeg_bytes(i, size=(256, 256))) for i in range(6)]
    full = write_shard(str(tmp_path / "full.tar"), samples)
    data = open(full, "rb").read()
    cut = str(tmp_path / "00001.tar")
    with open(cut, "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    write_sidecar(
        str(tmp_path / "00001.parquet"),
        [{"key": f"{i:04d}", "status": "success", "url": "", "error_message": None} for i in range(6)],
    )
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create([cut]) | ReadShards(ReadLimits())
        keys = out["samples"] | "SK" >> beam.Map(lambda s: s.key)
        fails = out["failures"] | "FK" >> beam.Map(lambda f: f.error_type)
        both = (
            (keys | "A" >> beam.Map(lambda k: ("sample", k)), fails | "B" >> beam.Map(lambda t: ("failure", t)))
            | beam.Flatten()
            | beam.combiners.Count.PerKey()
        )

        def check(counts):
            counts = dict(counts)
            assert counts["sample"] >= 2, counts
            assert counts["sample"] + counts["failure"] == 6, counts

        assert_that(both, check)
        assert_that(out["shards"] | beam.Map(lambda s: s["truncated"]), equal_to([True]), label="trunc")


def test_unsafe_names_and_duplicate_keys(tmp_path):
    a = write_shard(
        str(tmp_path / "00000.tar"),
        [
            sample("0001"),
            ("../../etc/evil", {"jpg": jpeg_bytes(1), "txt": b"x"}),
            sample("0002"),
            sample("0001"),
        ],
    )
    b = write_shard(str(tmp_path / "00001.tar"), [sample("0002"), sample("0009")])
    sa, sb = shard_name(a), shard_name(b)
    assert sa < sb  # "00000-<hash>" sorts first: the first shard keeps the key
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create([a, b]) | ReadShards(ReadLimits())
        assert_that(
            out["samples"] | "SK" >> beam.Map(lambda s: (s.key, s.shard)),
            equal_to([("0001", sa), ("0002", sa), ("0002", sb), ("0009", sb)]),
            label="s",
        )
        assert_that(
            out["failures"] | "FK" >> beam.Map(lambda f: (f.key, f.shard, f.error_type)),
            equal_to(
                [
                    ("../../etc/evil", sa, "unsafe_member_name"),
                    ("0001", sa, "duplicate_key"),
                    ("0002", sb, "duplicate_key"),
                ]
            ),
            label="f",
        )
    assert not os.path.exists("/etc/evil.jpg")


def _read(path, limits=ReadLimits()):
    items = list(iter_shard(str(path), limits))
    summary = items[-1]
    samples = {i.key: i for i in items[:-1] if isinstance(i, Sample)}
    failures = [(f.key, f.error_type) for f in items[:-1] if isinstance(f, Failure)]
    return samples, failures, summary


def _cut(tmp_path, name, n, where):
    """A shard of n samples cut at where(data, offsets of each sample's first header)."""
    import tarfile

    from tests.shardkit import add_member

    buf, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            offsets.append(tar.offset)
            key, members = sample(f"{i:04d}", image=jpeg_bytes(i, size=(128, 128)))
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data[: where(data, offsets)])
    return path


def test_member_cut_inside_its_data_reaches_the_manifest(tmp_path):
    path = _cut(tmp_path, "a.tar", 4, lambda d, o: o[2] + 512 + 300)
    samples, failures, summary = _read(path)
    assert set(samples) == {"0000", "0001"}
    assert failures == [("0002", "truncated_member")]
    assert summary["truncated"]


@pytest.mark.parametrize("where", [lambda d, o: o[2], lambda d, o: o[2] + 100])
def test_tar_cut_on_a_block_boundary_or_in_a_header_is_truncated(tmp_path, where):
    path = _cut(tmp_path, "b.tar", 4, where)
    write_sidecar(
        str(tmp_path / "b.parquet"),
        [{"key": f"{i:04d}", "status": "success", "url": "", "error_message": None} for i in range(4)],
    )
    samples, failures, summary = _read(path)
    assert set(samples) == {"0000", "0001"} and summary["truncated"]
    assert sorted(failures) == [("0002", "truncated_tar"), ("0003", "truncated_tar")]


def test_adjacent_repeated_key_does_not_merge(tmp_path):
    first = sample("0001", caption="first caption", image=jpeg_bytes(1))
    second = sample("0001", caption="second caption", image=jpeg_bytes(2))
    path = write_shard(str(tmp_path / "r.tar"), [first, second, sample("0002")])
    samples, failures, _ = _read(path)
    assert samples["0001"].caption == "first caption" and samples["0001"].image == jpeg_bytes(1)
    assert failures == [("0001", "duplicate_key")]


def test_dot_slash_members_link_only_keys_and_members_per_key(tmp_path):
    import tarfile

    from tests.shardkit import add_member

    path = tmp_path / "m.tar"
    with tarfile.open(path, "w") as tar:
        for ext, data in sample("0001")[1].items():
            add_member(tar, f"./{'./' if ext == 'txt' else ''}0001.{ext}", data)
        for ext in ("jpg", "txt"):
            info = tarfile.TarInfo(f"0002.{ext}")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        for ext, data in sample("0003")[1].items():
            add_member(tar, f"0003.{ext}", data)
        for i in range(10):
            add_member(tar, f"0003.x{i}", b"x")
    samples, failures, _ = _read(path, ReadLimits(max_members_per_key=8))
    assert set(samples) == {"0001"}
    assert sorted(failures) == [("0002", "link_member"), ("0003", "too_many_members")]


def test_caption_limits_hold_for_the_json_caption():
    meta = b'{"caption": "' + b"x" * 300 + b'"}'
    result = build_sample("k", "s", {"jpg": b"x", "json": meta}, ReadLimits(max_caption_bytes=100))
    assert isinstance(result, Failure) and result.error_type == "caption_too_long"
    assert isinstance(build_sample("k", "s", {"jpg": b"x", "json": meta}, ReadLimits()), Sample)
    big = build_sample("k", "s", {"jpg": b"x", "txt": b"c", "json": b"{}" + b" " * 200}, ReadLimits(max_json_bytes=100))
    assert isinstance(big, Failure) and big.error_type == "invalid_json"


def test_gzip_named_tar_and_integer_sidecar_keys(tmp_path):
    import gzip

    plain = write_shard(str(tmp_path / "p.tar"), [sample(f"{i:09d}") for i in range(3)])
    path = tmp_path / "z.tar"
    path.write_bytes(gzip.compress(open(plain, "rb").read()))
    rows = [{"key": i, "status": "success", "url": "", "error_message": None} for i in range(3)]
    rows.append({"key": 3, "status": "failed_to_download", "url": "u", "error_message": "404"})
    write_sidecar(str(tmp_path / "z.parquet"), rows)
    samples, failures, _ = _read(path)
    assert set(samples) == {"000000000", "000000001", "000000002"}
    assert failures == [("000000003", "failed_to_download")]  # matched by value, padded like the tar


def test_fifo_is_not_opened(tmp_path):
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    samples, failures, summary = _read(fifo)  # would block forever if opened
    assert not samples and not failures
    assert summary["truncated"] and summary["events"][0].startswith("unreadable_shard")


def test_shard_identity_is_the_full_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    names = {shard_name(str(p)) for p in (tmp_path / "a" / "00000.tar", tmp_path / "b" / "00000.tar")}
    names |= {shard_name(str(tmp_path / "web 1.tar")), shard_name(str(tmp_path / "web_1.tar"))}
    assert len(names) == 4
    from transforms.write import safe_part_name

    assert len({safe_part_name(n) for n in names}) == 4  # part files and cache entries too
    assert shard_name(str(tmp_path / "a" / "00000.tar")).startswith("00000-")
    assert shard_name("x/../a.tar") == shard_name(os.path.abspath("a.tar"))


def test_original_size_from_json_else_sidecar_and_notes(tmp_path):
    from tests.shardkit import png_bytes
    from transforms.process_shards import ShardSettings, decode_sample

    path = write_shard(
        str(tmp_path / "o.tar"),
        [
            sample("0001", meta={"original_width": 800, "original_height": 600}),
            sample("0002"),
            sample("0003", image=png_bytes(3)),  # PNG bytes under .jpg
        ],
    )
    write_sidecar(
        str(tmp_path / "o.parquet"),
        [
            {
                "key": k,
                "status": "success",
                "url": "",
                "error_message": None,
                "original_width": 1000,
                "original_height": 1,
            }
            for k in ("0001", "0002")
        ],
    )
    settings = ShardSettings(ReadLimits(), 64_000_000, phash=False, pixel_hash=True, cache_dir=None)
    sizes: dict = {}
    infos = {}
    for item in iter_shard(path, settings.limits, sizes):
        if isinstance(item, Sample):
            infos[item.key] = decode_sample(item, settings, None, sizes)[0]
    assert (infos["0001"].original_width, infos["0001"].original_height) == (800, 600)  # the json wins
    assert (infos["0002"].original_width, infos["0002"].original_height) == (1000, 1)
    assert (infos["0003"].original_width, infos["0003"].notes) == (0, "format_mismatch:png_as_jpg")
    assert infos["0003"].image_bytes == len(png_bytes(3)) and infos["0001"].notes == ""
