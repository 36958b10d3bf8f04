"""Kill a run with SIGKILL mid-way, start it again: finished shards come from the cache, and the
outputs equal an uninterrupted run's. Also: two runs give byte-identical tables."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def _run(job: str, shards: str, out: Path, *sets: str, wait: bool = True):
    cmd = [sys.executable, "-m", "pipeline.cli", "run", job, "--input", shards, "--output", str(out)]
    for s in sets:
        cmd += ["--set", s]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "run.json").read_text())


def _tables(run: dict) -> dict:
    return {k: v for k, v in run["checksums"].items() if not k.startswith("shards/")}


def test_two_runs_byte_identical(demo_data, tmp_path):
    job, shards = str(ROOT / "jobs" / "demo.yaml"), str(demo_data / "shards" / "*.tar")
    first = _run(job, shards, tmp_path / "a", "output.report=false")
    second = _run(job, shards, tmp_path / "b", "output.report=false", "run.cache=false")
    assert first["checksums"] and first["checksums"] == second["checksums"]
    for name in first["checksums"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_kill_and_resume(demo_data, tmp_path):
    job, shards = str(ROOT / "jobs" / "demo.yaml"), str(demo_data / "shards" / "*.tar")
    reference = _run(job, shards, tmp_path / "ref", "output.report=false", "run.cache=false")
    out = tmp_path / "killed"
    proc = _run(job, shards, out, "output.report=false", "run.debug_sleep_per_shard_s=4", wait=False)
    cache = out / "cache" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [p for p in cache.glob("*") if (p / "done.json").is_file()] if cache.is_dir() else []
        if done:
            break
        time.sleep(0.2)
    assert done, "no shard finished before the deadline"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_cached = len([p for p in cache.glob("*") if (p / "done.json").is_file()])
    assert 1 <= n_cached < 3, n_cached
    # after the crash nothing looks complete: no run.json, and every visible Parquet file reads
    assert not (out / "run.json").exists()
    for path in out.rglob("*.parquet"):
        if ".tmp-" not in str(path):
            pq.read_metadata(path)
    resumed = _run(job, shards, out, "output.report=false")
    assert resumed["counters"]["cache"]["shard_hits"] == n_cached
    assert resumed["counters"]["cache"]["shard_misses"] == 3 - n_cached
    assert _tables(resumed) == _tables(reference)
