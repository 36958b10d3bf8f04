import os
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, apply_override, load_job, parse_config

MEMSIEVE = [sys.executable, "-m", "pipeline.cli"]


def test_defaults_and_override(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: t\ninput: {path: 'x/*.tar'}\n")
    cfg = load_job(job, ["dedup.phash.max_hamming=7", "run.seed=3"], output_dir=str(tmp_path / "o"))
    assert cfg.dedup.phash.max_hamming == 7
    assert cfg.run.seed == 3
    assert cfg.output.dir == str(tmp_path / "o")


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"name": "t"}, "input"),
        ({"name": "t", "input": {"path": "a"}, "dedup": {"phash": {"max_hamming": 99}}}, "dedup.phash.max_hamming"),
        ({"name": "t", "input": {"path": "a"}, "dedup": {"bogus": 1}}, "dedup.bogus"),
        ({"name": "t", "input": {"path": "a"}, "run": {"max_failure_ratio": "lots"}}, "run.max_failure_ratio"),
        ({"name": "", "input": {"path": "a"}}, "name"),
    ],
)
def test_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(field)


def test_override_into_scalar_is_an_error():
    raw = {"name": "t", "input": {"path": "a"}}
    with pytest.raises(ConfigError, match="name"):
        apply_override(raw, "name.sub=1")


def test_bad_job_exits_2_and_writes_nothing(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("name: bad\ninput: {path: 'x/*.tar'}\ndedup: {keeper_typo: earliest}\n")
    out = tmp_path / "out"
    proc = subprocess.run([*MEMSIEVE, "run", str(job), "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "dedup.keeper_typo" in proc.stderr
    assert not out.exists()


def test_missing_input_exits_2(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ninput: {{path: '{tmp_path}/none/*.tar'}}\n")
    out = tmp_path / "out"
    proc = subprocess.run([*MEMSIEVE, "run", str(job), "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "input.path" in proc.stderr
    assert not out.exists()


def test_validate_shipped_jobs():
    root = os.path.dirname(os.path.dirname(__file__))
    for name in sorted(os.listdir(os.path.join(root, "jobs"))):
        proc = subprocess.run([*MEMSIEVE, "validate", os.path.join(root, "jobs", name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)
