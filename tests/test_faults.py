"""The fault suite end to end: every adversarial case accounted for, valid images kept, exit 0,
memory bounded, nothing written outside the output folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_fault_shards import JOB_YAML, account, format_table, make_fault_suite  # noqa: E402


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def _run_measured(cmd, cwd, timeout):
    """Run cmd; -> (CompletedProcess, peak RSS in MB of that run alone).

    RUSAGE_CHILDREN in pytest's own process would report the largest child of the whole session
    (other tests' runs included), so a small wrapper process measures this run's tree only.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    last = proc.stderr.rstrip().rsplit("\n", 1)[-1]
    peak_mb = int(last.split()[1]) / 1024 if last.startswith("peak_kb ") else float("inf")
    return proc, peak_mb


def test_fault_suite(tmp_path, capsys):
    shards = tmp_path / "in"
    cases = make_fault_suite(str(shards))
    assert len(cases) >= 91
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(JOB_YAML)
    before = _tree(tmp_path)
    proc, peak_mb = _run_measured(
        [sys.executable, "-m", "pipeline.cli", "run", str(job), "--input", str(shards / "*.tar"), "--output", str(out)],
        cwd=tmp_path / "work",
        timeout=600,  # a FIFO among the shards must not hang the run
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    created = {p for p in _tree(tmp_path) - before if not p.startswith("work/out")}
    assert created == {"work/out"} or created == set(), created  # nothing outside the output folder
    assert not (tmp_path / "escape").exists() and not Path("/abs").exists()
    result = account(cases, str(out))
    with capsys.disabled():
        print(f"\nfault suite: {len(cases)} cases, peak RSS of the run {peak_mb:.0f} MB")
        print(format_table(result))
    assert result["lost"] == 0
    assert result["survived"] == result["tried"], [r for r in result["rows"] if r[2] != r[1]]
    assert result["unexpected_keys"] == [] and result["repeated_keys"] == []
    assert peak_mb < 1500
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["keys"] == len({c["key"] for c in cases if c["key"] is not None})
    assert os.path.isfile(out / "report" / "index.html")
    lines = (out / "blocklist.txt").read_text(encoding="utf-8").splitlines()
    assert "http://x.invalid/a%0Ab%1B[31m" in lines  # the dropped copy whose url held a newline
    assert all(line.startswith("http://x.invalid/") and "\x1b" not in line for line in lines), lines


def test_same_shard_names_in_two_folders_stay_apart(tmp_path):
    """Two img2dataset outputs both starting at 00000.tar, and names that sanitise alike: no part
    file, cache entry or filtered shard is shared, every key is accounted for, repeats reported."""
    from tests.shardkit import jpeg_bytes, sample, write_shard
    from transforms.write import read_table

    src = tmp_path / "src"
    for folder, seed in (("a", 0), ("b", 50)):
        (src / folder).mkdir(parents=True)
        keys = [f"{folder}{i:03d}" for i in range(3)] + ["shared"]
        write_shard(
            str(src / folder / "00000.tar"), [sample(k, image=jpeg_bytes(seed + i)) for i, k in enumerate(keys)]
        )
    job = tmp_path / "job.yaml"
    job.write_text("name: ids\ninput: {path: x}\noutput: {report: false, filtered_shards: true}\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(job), "--input", str(src / "*" / "00000.tar")]
        + ["--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_table(str(out / "manifest")).to_pylist()
    assert sorted(r["key"] for r in manifest) == sorted(["a000", "a001", "a002", "b000", "b001", "b002", "shared"])
    shards = {r["shard"] for r in read_table(str(out / "shards")).to_pylist()}
    assert len(shards) == 2 and all(s.startswith("00000-") for s in shards)
    repeats = [r for r in read_table(str(out / "failures")).to_pylist() if r["error_type"] == "duplicate_key"]
    assert [r["key"] for r in repeats] == ["shared"]
    assert len(list((out / "cache" / "shards").iterdir())) == 2
    import tarfile

    filtered = {p.relative_to(out / "filtered").as_posix() for p in (out / "filtered").rglob("*.tar")}
    assert filtered == {"a/00000.tar", "b/00000.tar"}
    with tarfile.open(out / "filtered" / "b" / "00000.tar") as tar:
        names = {m.name.split(".")[0] for m in tar}
    assert {"b000", "b001", "b002"} <= names and not any(n.startswith("a") for n in names)


def test_blocklist_lines_hold_one_url_each():
    from pipeline.blocklist import clean_url

    cleaned = clean_url("http://x/a\nb\rc\x00d\x1b[31m\u2028e")
    assert cleaned.startswith("http://x/a%0Ab%0Dc%00d%1B[31m") and len(cleaned.splitlines()) == 1
