"""memsieve: curate text-to-image training sets against memorization.

The Python API (the command line is ``memsieve``; both are described in docs/)::

    import memsieve

    cfg = memsieve.load_job("jobs/demo.yaml", overrides=["dedup.keeper=earliest"])
    info = memsieve.run("jobs/demo.yaml", input="shards/*.tar", output="out/run1")
    memsieve.decide("out/run1", overrides=["decide.drop_duplicates=false"], output="out/run1-b")

The stages live in the ``pipeline``, ``transforms`` and ``schemas`` packages that ship with it.
Heavy libraries (Beam, torch) are imported only when a function needs them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["__version__", "decide", "load_job", "run", "RunFailed", "ConfigError"]


def load_job(path, overrides: list[str] | None = None, input: str | None = None, output: str | None = None):
    """A job file (YAML) -> a validated ``JobConfig``; raises ``ConfigError`` naming the field."""
    from pipeline.config import load_job as _load

    return _load(path, overrides, input_path=input, output_dir=output)


def run(
    job,
    input: str | None = None,
    output: str | None = None,
    overrides: list[str] | None = None,
    beam_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run a job (a path or a ``JobConfig``) to completion; returns the run.json content.

    Raises ``RunFailed`` past ``run.max_failure_ratio`` and ``ConfigError`` on bad configuration."""
    from pipeline.config import JobConfig
    from pipeline.job import run_job

    if isinstance(job, JobConfig):
        cfg = job
        if input or output or overrides:
            from pipeline.config import apply_override, parse_config

            raw = cfg.model_dump(mode="json")
            for assignment in overrides or []:
                apply_override(raw, assignment)
            if input:
                raw["input"]["path"] = input
            if output:
                raw["output"]["dir"] = output
            cfg = parse_config(raw)
    else:
        cfg = load_job(job, overrides, input=input, output=output)
    return run_job(cfg, list(beam_args or []))


def decide(run_dir: str, overrides: list[str] | None = None, output: str | None = None, dry_run: bool = False):
    """Re-decide a finished run from its stored annotations.

    ``output``: write the new decision set there (``run_dir`` untouched); ``dry_run``: return the
    change counts by decision and reason and write nothing. Returns the new run.json content (or
    the change counts)."""
    from pipeline import redecide

    if dry_run:
        return redecide.dry_run(run_dir, list(overrides or []))
    return redecide.redecide(run_dir, list(overrides or []), output=output)


def __getattr__(name: str):
    if name in ("RunFailed",):
        from pipeline.job import RunFailed

        return RunFailed
    if name == "ConfigError":
        from pipeline.config import ConfigError

        return ConfigError
    raise AttributeError(name)
