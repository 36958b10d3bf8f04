"""The keeper: the original of a copy is kept, even when img2dataset resized both to one size."""

import glob
import subprocess
import sys

import pytest

from schemas.elements import SampleInfo
from scripts.eval_keeper import pairs as flickr_pairs
from transforms.dedup import keeper_sort_key

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _info(key, w=256, h=256, ow=0, oh=0, nbytes=0, meta="{}"):
    return SampleInfo(key, "s", "", "", "", "", w, h, meta, ow, oh, nbytes)


def _keeper(policy, *infos):
    return sorted(infos, key=keeper_sort_key(policy))[0].key


def test_resolution_ranks_original_size_then_pixels_then_bytes_per_pixel_then_key():
    assert _keeper("resolution", _info("a", ow=200, oh=150), _info("b", ow=500, oh=375)) == "b"
    assert _keeper("resolution", _info("a", 256, 256), _info("b", 300, 300)) == "b"  # no original size
    assert _keeper("resolution", _info("a", nbytes=9000), _info("b", nbytes=30000)) == "b"  # less compressed
    assert _keeper("resolution", _info("b"), _info("a")) == "a"
    # a known original size beats an unknown one only when it is larger than the decoded size
    assert _keeper("resolution", _info("a", 256, 256), _info("b", 256, 256, ow=512, oh=512)) == "b"


def test_other_policies():
    assert _keeper("earliest", _info("b", ow=999, oh=999), _info("a")) == "a"
    metas = [_info("a", meta='{"aesthetic": 5}'), _info("b", meta='{"aesthetic": 7}'), _info("c")]
    assert _keeper("column:aesthetic", *metas) == "b"
    assert _keeper("column:aesthetic:asc", *metas) == "a"
    for bad in ("earlist", "column:", "column:x:sideways", "column:a:b:c"):
        with pytest.raises(ValueError, match="dedup.keeper"):
            keeper_sort_key(bad)


def test_flickr_pairs_keep_the_original(shared_data):
    """On the real shards: decoded sizes tie (both 256 px), the original size decides."""
    from transforms.process_shards import ShardSettings, decode_sample
    from transforms.read_shards import ReadLimits, iter_shard

    base = str(shared_data / "flickr8k-dev")
    pairs = flickr_pairs(base)
    wanted = {k for members in pairs.values() for k in members}
    settings = ShardSettings(ReadLimits(), 64_000_000, phash=False, pixel_hash=False, cache_dir=None)
    infos = {}
    for shard in sorted(glob.glob(f"{base}/img2dataset-256/*.tar")):
        sizes: dict = {}
        for item in iter_shard(shard, settings.limits, sizes):
            if getattr(item, "image", None) is not None and item.key in wanted:
                infos[item.key] = decode_sample(item, settings, None, sizes)[0]
    assert len(pairs) == 50 and len(infos) == 100
    ties = sum(len({(infos[k].width, infos[k].height) for k in m}) == 1 for m in pairs.values())
    assert ties >= 20  # the reason the decoded size alone kept the wrong copy
    kept = [m[_keeper("resolution", *(infos[k] for k in m))] for m in pairs.values()]
    assert kept.count("original") >= 49, kept.count("original")


@pytest.mark.slow
def test_flickr_demo_job_keeps_originals(shared_data, tmp_path):
    """Acceptance: jobs/demo.yaml on the Flickr shards (probe off for time) keeps >= 49 of 50."""
    from transforms.write import read_table

    base = str(shared_data / "flickr8k-dev")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        str(ROOT / "jobs" / "demo.yaml"),
        "--set",
        "probe.enabled=false",
    ]
    cmd += ["--input", f"{base}/img2dataset-256/*.tar", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = {r["key"]: r["decision"] for r in read_table(str(out / "manifest")).to_pylist()}
    good = 0
    for members in flickr_pairs(base).values():
        kept = [k for k in members if manifest[k] != "drop"]
        good += len(kept) == 1 and members[kept[0]] == "original"
    assert good >= 49
