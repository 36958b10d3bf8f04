"""Incremental mode: old shards, then new shards against them, give the clusters of one run."""

import shutil

from pipeline.config import parse_config
from pipeline.job import run_job
from transforms.write import read_table


def _cfg(path, out, **dedup):
    return parse_config(
        {
            "name": "t",
            "input": {"path": path},
            "output": {"dir": str(out), "report": False},
            "triggers": {"enabled": False},
            "dedup": dedup,
        }
    )


def _partition(out) -> set[frozenset]:
    groups: dict[str, set] = {}
    for r in read_table(str(out / "manifest")).to_pylist():
        if r["status"] == "ok":
            groups.setdefault(r["cluster_id"], set()).add(r["key"])
    return {frozenset(g) for g in groups.values()}


def test_old_then_new_equals_one_run(flickr_shards, tmp_path):
    src = tmp_path / "shards"
    for name in ("old", "new"):
        (src / name).mkdir(parents=True)
    base = flickr_shards.rsplit("/", 1)[0]
    for shard, part in (("00000", "old"), ("00001", "old"), ("00002", "new")):
        for ext in (".tar", ".parquet"):
            shutil.copy(f"{base}/{shard}{ext}", src / part / f"{shard}{ext}")
            shutil.copy(f"{base}/{shard}{ext}", src / f"{shard}{ext}")
    run_job(_cfg(str(src / "*.tar"), tmp_path / "full"))
    run_job(_cfg(str(src / "old" / "*.tar"), tmp_path / "old"))
    info = run_job(_cfg(str(src / "new" / "*.tar"), tmp_path / "inc", incremental_from=str(tmp_path / "old")))
    assert info["counters"]["cache"]["shard_misses"] == 1  # only the new shard was read and decoded
    full, inc = _partition(tmp_path / "full"), _partition(tmp_path / "inc")
    assert inc == full
    assert sum(len(g) == 2 for g in full) == 50
