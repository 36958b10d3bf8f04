"""The operator's view: the command line off a terminal (logs, progress, the JSON line, run.json
stages), the probe cache on a re-run, `--version`, `init`, and the Python package."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMSIEVE = [sys.executable, "-m", "pipeline.cli"]
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def _run(args, **kw):
    return subprocess.run([*MEMSIEVE, *args], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


def test_version_and_package():
    import memsieve

    proc = _run(["--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"memsieve {memsieve.__version__}"
    assert callable(memsieve.run) and callable(memsieve.decide) and callable(memsieve.load_job)
    cfg = memsieve.load_job(ROOT / "jobs" / "demo.yaml", ["dedup.keeper=earliest"], output="x")
    assert cfg.dedup.keeper == "earliest" and cfg.output.dir == "x"
    from memsieve.starter import job_files

    assert "demo.yaml" in job_files()


def test_init_writes_a_job_that_validates(tmp_path):
    folder = tmp_path / "project"
    proc = _run(["init", str(folder)])
    assert proc.returncode == 0, proc.stderr
    job = folder / "job.yaml"
    assert job.is_file() and (folder / "shards").is_dir()
    proc = _run(["validate", str(job)])
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["input"]["path"] == str(folder / "shards" / "*.tar")
    assert _run(["init", str(folder)]).returncode == 2  # an existing job is kept


def test_run_off_a_terminal_and_the_probe_cache(demo_data, tmp_path):
    """Acceptance 1 on one demo shard, twice: the re-run probes nothing."""
    out = tmp_path / "out"
    shard = str(demo_data / "shards" / "00000.tar")
    args = ["run", "jobs/demo.yaml", "--input", shard, "--output", str(out), "--set", "output.filtered_shards=false"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["keys"] > 0 and summary["output"] == str(out)
    lines = first.stderr.strip().splitlines()
    assert lines and all(ISO.match(line) for line in lines), [x for x in lines if not ISO.match(x)][:3]
    assert any(" progress probe: " in x for x in lines) and any(" progress dedup: " in x for x in lines)
    noisy = [x for x in lines if re.search(r" (INFO|DEBUG) (apache_beam|diffusers|transformers|urllib3)", x)]
    assert noisy == []
    run = json.loads((out / "run.json").read_text())
    for stage in ("read", "dedup", "probe", "decide", "write", "report"):
        assert run["stages"][stage]["seconds"] >= 0, stage
    assert run["stages"]["probe"]["cache_misses"] == 1 and run["stages"]["probe"]["items"] > 0

    second = _run(args)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "run.json").read_text())
    assert again["stages"]["probe"].get("cache_hits") == 1 and not again["stages"]["probe"].get("scored_captions")
    assert again["checksums"] == run["checksums"]  # the same scores and tables, byte for byte


def test_quiet_log_file_and_failed_run_line(tmp_path):
    """-q keeps stderr to warnings; --log-file gets the same lines; a failed run still ends with
    its JSON line (exit 1)."""
    job = tmp_path / "job.yaml"
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    job.write_text(f"name: t\ninput: {{path: '{bad}'}}\nprobe: {{enabled: false}}\noutput: {{report: false}}\n")
    log = tmp_path / "log.txt"
    proc = _run(["run", str(job), "--output", str(tmp_path / "o"), "--log-file", str(log), "--log-level", "info"])
    assert proc.returncode == 1
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["status"] == "failed" and line["exit_code"] == 1 and "failed" in line["error"]
    assert "run failed" in log.read_text() and all(ISO.match(x) for x in log.read_text().splitlines())
    quiet = _run(["-q", "run", str(job), "--output", str(tmp_path / "o2")])
    assert quiet.returncode == 1 and " INFO " not in quiet.stderr and "ERROR" in quiet.stderr


def test_log_level_debug_lets_libraries_speak(monkeypatch):
    import logging

    from pipeline import logs

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in logs.OURS})
    monkeypatch.setenv(logs.ENV_LEVEL, "info")  # restored after the test
    try:
        logs.setup("debug")
        assert logging.getLogger("apache_beam").getEffectiveLevel() == logging.DEBUG
        assert logs.beam_log_args([]) == []  # debug: Beam's workers log everything too
        logs.setup("info")
        assert logging.getLogger("apache_beam").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("pipeline.job").getEffectiveLevel() == logging.INFO
        assert "--default_sdk_harness_log_level=WARNING" in logs.beam_log_args(["--runner=DirectRunner"])
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "two\nlines", None, None)
        assert ISO.match(
            logs.OneLineFormatter(logs.FORMAT).format(record) + ""
        ) and "two | lines" in logs.OneLineFormatter(logs.FORMAT).format(record)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
