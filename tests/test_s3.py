"""A round trip through a real S3 API: moto's server on 127.0.0.1 (started and stopped here), the
Flickr shards uploaded to it, ``--input s3://...`` (a brace range) and ``--output s3://...``, the
manifest read back with pyarrow's own S3 filesystem and compared with a local run's."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAST = ["probe.enabled=false", "triggers.enabled=false", "output.report=true", "output.filtered_shards=true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
    pytest.importorskip("s3fs", reason="s3fs (a dev dependency) is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    # fsspec caches filesystem instances by their arguments, not by the endpoint the environment
    # names: an instance from another module's server (stopped since) would be handed back
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield dict(env, port=str(port))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(timeout=10)


def _pyarrow_s3(env):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{env['port']}",
        scheme="http",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_DEFAULT_REGION"],
    )


def _run(shards: str, out: str, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "jobs" / "demo.yaml"), "--input", shards]
    cmd += ["--output", out]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _sorted_rows(table) -> list[dict]:
    """Rows by key; the shard column names the shard by its file name plus a hash of its full
    path (s3://... here, /work/... there), so only its file name is compared."""
    rows = [dict(r, shard=r["shard"].rsplit("-", 1)[0]) for r in table.to_pylist()]
    return sorted(rows, key=lambda r: r["key"])


def test_s3_round_trip_equals_local_run(s3_env, flickr_shards, tmp_path):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    import s3fs

    folder = Path(flickr_shards).parent
    fs = s3fs.S3FileSystem()
    fs.mkdir("memsieve-test")
    for f in sorted(folder.iterdir()):
        fs.put_file(str(f), f"memsieve-test/flickr/{f.name}")

    remote = _run("s3://memsieve-test/flickr/{00000..00002}.tar", "s3://memsieve-test/out", *FAST)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = _run(str(folder / "*.tar"), str(tmp_path / "local"), *FAST)
    assert local.returncode == 0, local.stderr[-3000:]

    s3 = _pyarrow_s3(s3_env)
    manifest = ds.dataset("memsieve-test/out/manifest", format="parquet", filesystem=s3).to_table()
    assert manifest.num_rows == len(set(manifest.column("key").to_pylist())) == 553
    expected = pq.read_table(tmp_path / "local" / "manifest")
    assert _sorted_rows(manifest) == _sorted_rows(expected)

    with s3.open_input_stream("memsieve-test/out/run.json") as f:
        run = json.loads(f.read())
    assert run["summary"]["keys"] == 553 and run["input"]["n_shards"] == 3
    local_run = json.loads((tmp_path / "local" / "run.json").read_text())
    assert run["summary"] == local_run["summary"]
    assert len(run["checksums"]) == len(local_run["checksums"])

    # filtered shards are read from S3 (not silently empty) and equal the local ones byte for byte
    local_filtered = sorted((tmp_path / "local" / "filtered").glob("*.tar"))
    remote_filtered = sorted(fs.find("memsieve-test/out/filtered"))
    assert [p.name for p in local_filtered] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.rsplit("/", 1)[1][:5] for p in remote_filtered] == ["00000", "00001", "00002"]
    assert run["outputs"]["filtered_samples"] == local_run["outputs"]["filtered_samples"] > 400
    for local_tar, remote_tar in zip(local_filtered, remote_filtered, strict=True):
        with s3.open_input_stream(remote_tar) as f:
            assert f.read() == local_tar.read_bytes(), remote_tar

    names = set(fs.ls("memsieve-test/out", detail=False))
    assert "memsieve-test/out/report" in names and fs.exists("memsieve-test/out/report/index.html")
    assert not fs.exists("memsieve-test/out/_lock")
    assert not fs.find("memsieve-test/out/_staging")  # the committed run left no staging objects
    assert not (ROOT / "s3:").exists()  # nothing written to a local folder named after the scheme


def test_s3_output_lock_and_foreign_files_are_refused(s3_env, demo_data):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("memsieve-refuse")
    shards = str(demo_data / "shards" / "*.tar")
    fs.pipe_file("memsieve-refuse/foreign/notes.txt", b"mine")
    proc = _run(shards, "s3://memsieve-refuse/foreign", *FAST)
    assert proc.returncode == 2 and "notes.txt" in proc.stderr, proc.stderr[-2000:]
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": "held"}
    fs.pipe_file("memsieve-refuse/locked/_lock", json.dumps(lock).encode())
    proc = _run(shards, "s3://memsieve-refuse/locked", *FAST)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr, proc.stderr[-2000:]
    fs.invalidate_cache()
    assert sorted(fs.find("memsieve-refuse")) == ["memsieve-refuse/foreign/notes.txt", "memsieve-refuse/locked/_lock"]
