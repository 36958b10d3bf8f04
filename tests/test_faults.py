"""The fault suite end to end: every adversarial case accounted for, valid images kept, exit 0,
memory bounded, nothing written outside the output folder."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_fault_shards import JOB_YAML, account, format_table, make_fault_suite  # noqa: E402


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_fault_suite(tmp_path, capsys):
    shards = tmp_path / "in"
    cases = make_fault_suite(str(shards))
    assert len(cases) >= 91
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(JOB_YAML)
    before = _tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(job), "--input", str(shards / "*.tar"), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path / "work",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
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
