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


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"dedup": {"keeper": "earlist"}}, "dedup.keeper"),
        ({"dedup": {"keeper": "column:"}}, "dedup.keeper"),
        ({"dedup": {"keeper": "column:score:up"}}, "dedup.keeper"),
        ({"dedup": {"clip": {"device": "gpu"}}}, "dedup.clip.device"),
        ({"probe": {"device": "cuda0"}}, "probe.device"),
        ({"probe": {"metric": "magnitud"}}, "probe.metric"),
        ({"probe": {"budget": "some"}}, "probe.budget"),
        ({"probe": {"enabled": True}}, "probe.model"),
        ({"run": {"runner": "Direct Runner"}}, "run.runner"),
        ({"decide": {"trigger_kinds": ["word"]}}, "decide.trigger_kinds"),
        ({"triggers": {"related_pairs": ["dog"]}}, "triggers.related_pairs"),
        ({"diversify": {"strategies": ["XX"]}}, "diversify.strategies"),
        ({"dedup": {"clip": {"model": " "}}}, "dedup.clip.model"),
    ],
)
def test_enums_and_patterns_checked_at_load(raw, field):
    with pytest.raises(ConfigError) as err:
        parse_config(dict(name="t", input={"path": "a"}, **raw))
    assert str(err.value).startswith(field), str(err.value)


@pytest.mark.parametrize("keeper", ["resolution", "earliest", "centre", "column:aesthetic", "column:a_b.c:asc"])
def test_valid_keepers(keeper):
    assert parse_config({"name": "t", "input": {"path": "a"}, "dedup": {"keeper": keeper}}).dedup.keeper == keeper


def test_preflight_beam_args_and_runner():
    from pipeline.preflight import check_beam_args, check_runner

    assert check_beam_args(["--runner=PortableRunner", "--job_endpoint=embed"], "DirectRunner") == "PortableRunner"
    assert check_beam_args(["--direct_num_workers", "2"], "DirectRunner") == "DirectRunner"
    with pytest.raises(
        ConfigError, match=r"^run: unknown Beam option --runer=DataflowRunner \(did you mean --runner\?\)"
    ):
        check_beam_args(["--runer=DataflowRunner"], "DirectRunner")
    with pytest.raises(ConfigError, match=r"^input.path: .*quote it: --input 'in/\*.tar'"):
        check_beam_args(["in/00001.tar", "in/00002.tar"], "DirectRunner")
    with pytest.raises(ConfigError, match="^run.runner: unknown Beam runner 'DirectRuner'"):
        check_runner("DirectRuner")
    check_runner("apache_beam.runners.dask.dask_runner.DaskRunner")


def test_preflight_models_and_output(tmp_path):
    from pipeline.config import ClipConfig, ProbeConfig
    from pipeline.preflight import check_clip, check_output, check_probe

    with pytest.raises(ConfigError, match="^probe.model: .*not a local folder, nor a hub id in the local cache"):
        check_probe(ProbeConfig(enabled=True, model="models/not-there"))
    with pytest.raises(ConfigError, match="^probe.model: .* does not exist"):
        check_probe(ProbeConfig(enabled=True, model=str(tmp_path / "a" / "b" / "c")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="^probe.model: .*no model_index.json"):
        check_probe(ProbeConfig(enabled=True, model=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="^dedup.clip.pretrained: CLIP without pretrained weights"):
        check_clip(ClipConfig(enabled=True))
    spec = tmp_path / "tiny.json"
    spec.write_text("{}")
    check_clip(ClipConfig(enabled=True, model=str(spec), allow_random_weights=True))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="^output.dir: .* is not a folder"):
        check_output(str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match="^output.dir: "):
        check_output(str(tmp_path / "afile" / "sub"))
    check_output(str(tmp_path / "new" / "deeper"))


def _finished_run(tmp_path):
    from tests.shardkit import sample, write_shard

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_shard(str(src / f"0000{i}.tar"), [sample(f"{i}{k:03d}") for k in range(3)])
    job = tmp_path / "job.yaml"
    job.write_text("name: t\ninput: {path: x}\noutput: {report: false}\ntriggers: {enabled: false}\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [*MEMSIEVE, "run", str(job), "--input", str(src / "*.tar"), "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return src, job, out


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_refused_reruns_exit_2_and_leave_the_finished_run_untouched(tmp_path):
    src, job, out = _finished_run(tmp_path)
    before = _snapshot(out)
    base = [*MEMSIEVE, "run", str(job), "--input", str(src / "*.tar"), "--output", str(out)]
    cases = [
        (["--set", "probe.enabled=true", "--set", f"probe.model={tmp_path}/no-model"], "probe.model"),
        (["--set", "dedup.keeper=earlist"], "dedup.keeper"),
        (["--runer=DataflowRunner"], "run: unknown Beam option --runer"),
        (["--set", "dedup.clip.enabled=true"], "dedup.clip.pretrained"),
        ([str(src / "00001.tar"), str(src / "00002.tar")], "input.path"),
    ]
    for extra, field in cases:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True)
        assert proc.returncode == 2, (extra, proc.stderr[-1500:])
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
        assert last.startswith(f"memsieve: configuration error: {field}"), last
        assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [*MEMSIEVE, "decide", str(out), "--set", "dedup.keeper=earliest"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "dedup.keeper: memsieve decide changes only" in proc.stderr
    assert _snapshot(out) == before
