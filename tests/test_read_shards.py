import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.elements import Failure, Sample
from tests.shardkit import jpeg_bytes, sample, write_shard, write_sidecar
from transforms.read_shards import ReadLimits, ReadShards, build_sample, split_member_name


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
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create([a, b]) | ReadShards(ReadLimits())
        assert_that(
            out["samples"] | "SK" >> beam.Map(lambda s: (s.key, s.shard)),
            equal_to([("0001", "00000"), ("0002", "00000"), ("0002", "00001"), ("0009", "00001")]),
            label="s",
        )
        assert_that(
            out["failures"] | "FK" >> beam.Map(lambda f: (f.key, f.shard, f.error_type)),
            equal_to(
                [
                    ("../../etc/evil", "00000", "unsafe_member_name"),
                    ("0001", "00000", "duplicate_key"),
                    ("0002", "00001", "duplicate_key"),
                ]
            ),
            label="f",
        )
    assert not os.path.exists("/etc/evil.jpg")
