"""The fault suite end to end: every adversarial case accounted for, exit 0, memory bounded,
nothing written outside the output folder."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from transforms.write import read_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_fault_shards import make_fault_suite  # noqa: E402


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_fault_suite(tmp_path, capsys):
    shards = tmp_path / "in"
    cases = make_fault_suite(str(shards))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: faults\ninput: {path: x}\noutput: {report: true, filtered_shards: true}\nrun: {max_failure_ratio: 0.9}\n"
    )
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
    manifest = {r["key"]: r for r in read_table(str(out / "manifest")).to_pylist()}
    failures: dict[str, set] = {}
    for r in read_table(str(out / "failures")).to_pylist():
        failures.setdefault(r["key"], set()).add(r["error_type"])
    table, lost = [], 0
    for c in cases:
        if c["expect"] == "event":
            shard_rows = read_table(str(out / "shards")).to_pylist()
            survived = len(shard_rows) == 7
            table.append((c["case"], survived, 0))
            continue
        if c["expect"] == "ok-or-failed:truncated_tar":
            keys = [f"2000000{i}" for i in range(1, 9)]
            missing = [k for k in keys if k not in manifest]
            ok = all(
                manifest[k]["status"] == "ok" or "truncated_tar" in failures.get(k, ()) for k in keys if k in manifest
            )
            table.append((c["case"], not missing and ok, len(missing)))
            lost += len(missing)
            continue
        row = manifest.get(c["key"])
        if row is None:
            lost += 1
            table.append((c["case"], False, 1))
            continue
        if c["expect"] == "ok":
            survived = row["status"] == "ok"
        else:
            survived = row["status"] == "failed" and c["expect"].split(":", 1)[1] in failures.get(c["key"], ())
        table.append((c["case"], survived, 0))
    with capsys.disabled():
        print(f"\nfault suite: {len(table)} cases, peak RSS of the run {peak_mb:.0f} MB")
        print(f"{'case':58s} survived lost")
        for name, survived, n_lost in table:
            print(f"{name:58s} {'yes' if survived else 'NO':8s} {n_lost}")
    assert lost == 0
    assert all(s for _, s, _ in table), [t for t in table if not t[1]]
    assert peak_mb < 3000
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["keys"] == len(manifest)
    assert all(len(v) == 1 for v in failures.values()), failures
    assert os.path.isfile(out / "report" / "index.html")
