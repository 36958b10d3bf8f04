"""``memsieve init DIR``: a starter job file that ``memsieve validate`` accepts."""

from __future__ import annotations

import json
import os
import re
from importlib import resources

from pipeline.config import ConfigError


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quotes and all


def starter_text(name: str, input_glob: str, output_dir: str) -> str:
    template = resources.files("memsieve").joinpath("templates/starter.yaml").read_text(encoding="utf-8")
    return template.format(name=_yaml_str(name), input=_yaml_str(input_glob), output=_yaml_str(output_dir))


def write_starter_job(folder: str, input_glob: str | None = None, force: bool = False) -> str:
    """Write ``folder/job.yaml`` (reading ``folder/shards/*.tar`` into ``folder/out`` unless told
    otherwise); returns its path. An existing job.yaml is kept unless ``force``."""
    from pipeline.config import load_job

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "job.yaml")
    if os.path.exists(path) and not force:
        raise ConfigError(f"init: {path} exists (use --force to overwrite it)")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(os.path.abspath(folder))).strip("-") or "job"
    folder_abs = os.path.abspath(folder)
    text = starter_text(
        name,
        input_glob or os.path.join(folder_abs, "shards", "*.tar"),
        os.path.join(folder_abs, "out"),
    )
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    load_job(path)  # what we wrote must validate
    os.makedirs(os.path.join(folder_abs, "shards"), exist_ok=True)
    return path


def job_files() -> dict[str, str]:
    """The job files that ship with memsieve: {name: text} (from the wheel, or the checkout)."""
    out = {}
    shipped = resources.files("memsieve").joinpath("jobs")
    if shipped.is_dir():
        for entry in shipped.iterdir():
            if entry.name.endswith(".yaml"):
                out[entry.name] = entry.read_text(encoding="utf-8")
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")
    if not out and os.path.isdir(checkout):
        for name in sorted(os.listdir(checkout)):
            if name.endswith(".yaml"):
                with open(os.path.join(checkout, name), encoding="utf-8") as f:
                    out[name] = f.read()
    return dict(sorted(out.items()))
