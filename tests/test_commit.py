"""The output commit protocol (pipeline/outdir.py): a run killed anywhere leaves the previous run's
manifest and run.json byte-identical; a resumed run completes with the uninterrupted manifest; a
lock refuses a second run; outputs that are unsafe to write are refused before anything is
written. Plus the filesystem layer's listing (brace ranges, gzip tars, skipped files)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from transforms import fsio

ROOT = Path(__file__).resolve().parent.parent
FAST = ["output.report=false", "probe.enabled=false", "triggers.enabled=false"]


def _cmd(shards: str, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "jobs" / "demo.yaml"), "--input", shards]
    cmd += ["--output", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _run(shards, out, *sets, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(_cmd(shards, out, *sets), capture_output=True, text=True, cwd=ROOT, env=full_env)


def _snapshot(out: Path) -> dict[str, bytes]:
    """The committed products a reader sees: run.json and every table file."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] not in ("cache", "_staging", "_lock", ".memsieve")
    }


def _assert_clean(out: Path) -> None:
    assert not (out / "_lock").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def base_run(demo_data, tmp_path_factory):
    """A finished run (the 'previous run' every fault must leave intact)."""
    out = tmp_path_factory.mktemp("commit") / "out"
    tmp = tmp_path_factory.mktemp("tmpdir")
    shards = str(demo_data / "shards" / "*.tar")
    proc = _run(shards, out, *FAST, env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp.iterdir()), "temporary files left in $TMPDIR"
    return shards, out


def test_kill_at_each_point_keeps_the_previous_run(base_run):
    shards, out = base_run
    before = _snapshot(out)
    assert "run.json" in before and any(k.startswith("manifest/") for k in before)
    # reading: killed while shards are read (one finished shard in the cache), a changed config
    proc = subprocess.Popen(
        _cmd(shards, out, *FAST, "run.debug_sleep_per_shard_s=3", "read.max_caption_bytes=10000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    _kill_when(proc, lambda: any(out.glob("_staging/*")) and (out / "_lock").exists())
    assert _snapshot(out) == before
    # writing tables, then writing the report: the staged run never reaches OUT
    for point, extra in (("tables", []), ("report", ["output.report=true"])):
        killed = _run(shards, out, *FAST, "decide.drop_duplicates=false", *extra, env={"MEMSIEVE_FAULT_AT": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        assert _snapshot(out) == before, point
    # a failed run (exit 1, over the failure cap) keeps the previous run and writes diagnostics
    failed = _run(shards, out, *FAST, "run.max_failure_ratio=0.01")
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert _snapshot(out) == before
    assert list(out.glob("_staging/*/diagnostics.json")) and not list(out.glob("_staging/*/run.json"))
    # the resumed run (the base config again) completes with the uninterrupted run's tables
    resumed = _run(shards, out, *FAST)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "run.json" and not k.startswith("shards/")} == {
        k: v for k, v in before.items() if k != "run.json" and not k.startswith("shards/")
    }
    assert json.loads(after["run.json"])["checksums"] == json.loads(before["run.json"])["checksums"]
    assert not (out / "_staging").exists()  # the stale staging folders went with the next run
    _assert_clean(out)


def test_kill_inside_the_commit_is_finished_by_the_next_run(base_run, tmp_path):
    shards, out = base_run
    before = _snapshot(out)
    changed = ["decide.drop_duplicates=false"]
    killed = _run(shards, out, *FAST, *changed, env={"MEMSIEVE_FAULT_AT": "commit"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "run.json").exists()  # mid-commit a reader sees no finished run, never a mix
    assert not (out / "manifest").exists()
    rerun = _run(shards, out, *FAST)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["decide"]["drop_duplicates"] is True
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k.startswith("manifest/")} == {
        k: v for k, v in before.items() if k.startswith("manifest/")
    }
    _assert_clean(out)


@pytest.mark.slow
def test_kill_during_dedup_keeps_the_previous_run(base_run):
    """Killed after every shard was read (cache complete), while dedup and the writers run."""
    shards, out = base_run
    before = _snapshot(out)
    proc = subprocess.Popen(
        _cmd(shards, out, *FAST, "decide.drop_duplicates=false", "dedup.phash.max_hamming=12"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    _kill_when(proc, lambda: (out / "_lock").exists() and any(out.glob("_staging/*/manifest")))
    assert _snapshot(out) == before
    resumed = _run(shards, out, *FAST)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(_snapshot(out)["run.json"])["checksums"] == json.loads(before["run.json"])["checksums"]
    _assert_clean(out)


def test_lock_refuses_a_second_run_and_stale_locks_are_taken_over(base_run):
    from pipeline import outdir
    from pipeline.config import ConfigError

    shards, out = base_run
    before = _snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "_lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "run_id": "x"}))
        proc = _run(shards, out, *FAST)
        assert proc.returncode == 2
        assert f"pid {holder.pid}" in proc.stderr and socket.gethostname() in proc.stderr
        assert "Traceback" not in proc.stderr
        assert _snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and is taken over (then released)
    with outdir.locked(str(out)) as run_id:
        assert json.loads((out / "_lock").read_text())["run_id"] == run_id
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with outdir.locked(str(out)):
                pass
    assert not (out / "_lock").exists()


def _refused(shards: str, out, what: str) -> str:
    proc = _run(shards, out, *FAST)
    assert proc.returncode == 2, (what, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    return proc.stderr


def test_unsafe_outputs_are_refused_before_anything_is_written(demo_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data / "shards", data)
    listing = sorted(p.name for p in data.iterdir())
    assert "contains the input" in _refused(str(data / "*.tar"), data, "output holds the input")
    assert sorted(p.name for p in data.iterdir()) == listing  # nothing added, nothing deleted
    # a parent of the input folder is refused too
    assert "contains the input" in _refused(str(data / "*.tar"), tmp_path, "output above the input")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "notes.txt" in _refused(str(data / "*.tar"), foreign, "unknown files")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "not a folder" in _refused(str(data / "*.tar"), a_file, "a file")
    assert "a_file" in _refused(str(data / "*.tar"), a_file / "out", "under a file")
    if os.geteuid() != 0:  # root writes through the mode bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert "not writable" in _refused(str(data / "*.tar"), ro / "out", "read-only")


# ----------------------------------------------------------------------------- listing and cache keys


def test_brace_patterns_expand():
    assert fsio.expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert fsio.expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert fsio.expand_braces("x{y}z") == ["x{y}z"]
    assert len(fsio.expand_braces("{00000..09999}.tar")) == 10_000


def test_every_matched_file_is_read_or_named_as_skipped(demo_data, tmp_path):
    from pipeline.job import list_input
    from schemas.elements import Sample
    from transforms.read_shards import ReadLimits, iter_shard

    src = demo_data / "shards" / "00000.tar"
    with tarfile.open(src) as tin, tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tout:
        for m in tin:
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    (tmp_path / "b.TGZ").write_bytes((tmp_path / "a.tar.gz").read_bytes())
    (tmp_path / "c.TAR").write_bytes(src.read_bytes())
    (tmp_path / "c.parquet").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    os.mkfifo(tmp_path / "pipe.tar")  # a shard the reader reports as unreadable (never opened)
    os.mkfifo(tmp_path / "pipe")
    fmt, shards, skipped = list_input(str(tmp_path / "*"))
    assert fmt == "webdataset"
    assert [Path(p).name for p in shards] == ["a.tar.gz", "b.TGZ", "c.TAR", "pipe.tar"]
    assert {Path(p).name: why for p, why in skipped["files"].items()}.keys() == {"notes.txt", "pipe"}
    assert skipped["sidecars_seen"] == 1
    # a brace range over the same folder, and the gzip tar reads like the plain one
    assert [Path(p).name for p in list_input(str(tmp_path / "{a.tar.gz,c.TAR,missing.tar}"))[1]] == [
        "a.tar.gz",
        "c.TAR",
    ]
    paths = (str(src), str(tmp_path / "a.tar.gz"))
    keys = [{s.key for s in iter_shard(p, ReadLimits()) if isinstance(s, Sample)} for p in paths]
    assert keys[0] and keys[0] == keys[1]


def test_cache_key_is_content_and_sidecar_not_mtime(tmp_path):
    from transforms import shard_cache

    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"a" * 1024)
    first = shard_cache.fingerprint(str(shard), {"s": 1})
    stat = shard.stat()
    shard.write_bytes(b"b" * 1024)  # same size, same mtime: different content
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = shard_cache.fingerprint(str(shard), {"s": 1})
    assert second != first
    (tmp_path / "00000.parquet").write_bytes(b"sidecar written later")
    third = shard_cache.fingerprint(str(shard), {"s": 1})
    assert third != second
    assert shard_cache.fingerprint(str(shard), {"s": 2}) != third
    assert shard_cache.fingerprint(str(shard), {"s": 1}) == third


def test_incremental_reads_only_the_shards_run_json_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms import shard_cache
    from transforms.incremental import load_reference
    from transforms.process_shards import INFO_SCHEMA
    from transforms.read_shards import shard_name

    run = tmp_path / "old"
    kept, gone = tmp_path / "kept.tar", tmp_path / "gone.tar"
    for path in (kept, gone):
        path.write_bytes(path.name.encode() * 100)
        fp = shard_cache.fingerprint(str(path), {})
        row = {f.name: (0 if pa.types.is_integer(f.type) else "") for f in INFO_SCHEMA}
        row.update(key=path.stem, shard=path.stem)
        entry = shard_cache.entry_dir(str(run / "cache"), "shards", shard_name(str(path)), fp)
        shard_cache.store(entry, {"infos": ([row], INFO_SCHEMA)})
    (run / "annotations").mkdir()
    cols = {"key": ["kept"], "status": ["ok"], "cluster_id": ["kept"], "cluster_size": [1], "cluster_similarity": [1.0]}
    pq.write_table(pa.table(cols), run / "annotations" / "part-kept.parquet")
    (run / "run.json").write_text(json.dumps({"input": {"shards": [str(kept)]}, "config": {}}))
    ref = load_reference(str(run))
    assert ref["keys"] == {"kept"}  # the cache's entry for gone.tar (not in run.json) stays out


def test_an_unquoted_glob_is_refused(demo_data, tmp_path):
    shards = sorted(str(p) for p in (demo_data / "shards").glob("*.tar"))
    cmd = _cmd(shards[0], tmp_path / "out", *FAST) + shards[1:]  # what the shell makes of --input *.tar
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "quote it" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
