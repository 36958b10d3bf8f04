"""Preflight: everything a run needs, checked before any output is touched (exit 2 naming the field).

``load_job`` already checked every field's type, range, enum and pattern. This adds what needs
the machine: Beam options that Beam itself does not know (a typo such as ``--runer`` would
otherwise run locally and exit 0), shard paths passed as extra arguments (an unquoted glob the
shell expanded), model folders and hub ids resolvable offline, CLIP without pretrained weights
(refused unless ``dedup.clip.allow_random_weights``), and an output location that can be written.
Heavy imports (open_clip, huggingface_hub) happen only when the stage they check is enabled.
"""

from __future__ import annotations

import difflib
import os

from pipeline.config import ConfigError, JobConfig

SHORT_RUNNERS = (
    "DirectRunner",
    "BundleBasedDirectRunner",
    "SwitchingDirectRunner",
    "PrismRunner",
    "PortableRunner",
    "DataflowRunner",
    "FlinkRunner",
    "SparkRunner",
    "DaskRunner",
    "InteractiveRunner",
    "TestDataflowRunner",
    "TestDirectRunner",
)
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".parquet")


def preflight(cfg: JobConfig, beam_args: list[str] | None = None) -> None:
    """Raise ConfigError (one line, naming the field) for anything that would fail later."""
    runner = check_beam_args(list(beam_args or []), cfg.run.runner)
    check_runner(runner)
    check_output(cfg.output.dir)
    if cfg.dedup.incremental_from and "://" not in cfg.dedup.incremental_from:
        if not os.path.isdir(cfg.dedup.incremental_from):
            raise ConfigError(f"dedup.incremental_from: {cfg.dedup.incremental_from} is not a folder")
    if cfg.dedup.clip.enabled:
        check_clip(cfg.dedup.clip)
    if cfg.probe.enabled:
        check_probe(cfg.probe)


def _beam_parser(runner: str):
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    if "dask" in runner.lower():  # the Dask runner's options are registered by its module
        try:
            import apache_beam.runners.dask.dask_runner  # noqa: F401
        except ImportError:
            pass
    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
    return parser


def check_beam_args(args: list[str], default_runner: str) -> str:
    """Unknown Beam flags and stray positional arguments -> ConfigError; returns the runner."""
    runner = default_runner
    for a in args:
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
    if not args:
        return runner
    parser = _beam_parser(runner)
    known, unknown = parser.parse_known_args(args)
    runner = getattr(known, "runner", None) or runner
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        name = flags[0].split("=", 1)[0]
        options = [o for action in parser._actions for o in action.option_strings]
        close = difflib.get_close_matches(name, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"run: unknown Beam option {flags[0]}{hint}; memsieve passes unknown options to Beam")
    stray = [a for a in unknown if not a.startswith("-")]
    if stray:
        shardlike = [a for a in stray if a.lower().endswith(SHARD_SUFFIXES) or os.path.exists(a)]
        if shardlike:
            folder = os.path.dirname(shardlike[0]) or "."
            suffix = next((s for s in SHARD_SUFFIXES if shardlike[0].lower().endswith(s)), ".tar")
            raise ConfigError(
                f"input.path: {len(stray)} extra argument(s) look like shards ({', '.join(stray[:3])}"
                f"{', ...' if len(stray) > 3 else ''}): the shell expanded an unquoted glob; "
                f"quote it: --input '{folder}/*{suffix}'"
            )
        raise ConfigError(f"run: unexpected argument(s) {' '.join(stray[:5])}")
    return runner


def check_runner(runner: str) -> None:
    import importlib.util

    if runner in SHORT_RUNNERS:
        return
    if "." in runner:
        module = runner.rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return
    close = difflib.get_close_matches(runner, SHORT_RUNNERS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"run.runner: unknown Beam runner {runner!r}{hint}")


def check_output(out_dir: str) -> None:
    """The output folder is a folder (or can be made one) and can be written."""
    if "://" in out_dir:
        return
    path = os.path.abspath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output.dir: {out_dir} exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"output.dir: {probe} is not a folder, so {out_dir} cannot be made")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir: {probe} is not writable")


def _hub_cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id that is not a valid repo name
        return False
    return isinstance(found, str) and os.path.exists(found)


def _is_hub_id(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name)) and not name.startswith((".", "/"))


def check_probe(probe) -> None:
    model = str(probe.model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ConfigError(f"probe.model: {model} is a folder but not a diffusers model (no model_index.json)")
    elif os.path.exists(model):
        raise ConfigError(f"probe.model: {model} is not a folder")
    elif not _is_hub_id(model):
        raise ConfigError(f"probe.model: {model} does not exist")
    elif not _hub_cached(model, "model_index.json"):
        raise ConfigError(f"probe.model: {model!r} is not a local folder, nor a hub id in the local cache (offline)")
    if probe.reference_captions and not os.path.isfile(probe.reference_captions):
        raise ConfigError(f"probe.reference_captions: {probe.reference_captions} does not exist")


def check_clip(clip) -> None:
    if clip.pretrained is None:
        if not clip.allow_random_weights:
            raise ConfigError(
                "dedup.clip.pretrained: CLIP without pretrained weights embeds with random weights; give "
                "a tag or a checkpoint, or set dedup.clip.allow_random_weights: true (tests, benchmarks)"
            )
    model = clip.model
    if model.startswith("local-dir:"):
        if not os.path.isdir(model[len("local-dir:") :]):
            raise ConfigError(f"dedup.clip.model: {model} is not a folder")
        return
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise ConfigError(f"dedup.clip.model: {model} does not exist")
        return
    import open_clip

    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"dedup.clip.model: {model!r} is not an open_clip model{hint}")
    pretrained = clip.pretrained
    if pretrained is None or os.path.exists(pretrained):
        return
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)[:6])
        raise ConfigError(f"dedup.clip.pretrained: {pretrained!r} is not a file, folder or tag of {model} ({tags})")
    hub = str(cfg.get("hf_hub") or "").rstrip("/")
    repo = hub.split("/")[0] + "/" + hub.split("/")[1] if hub.count("/") >= 1 else ""
    files = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
    if not repo or not any(_hub_cached(repo, f) for f in files):
        raise ConfigError(
            f"dedup.clip.pretrained: the weights of {model}/{pretrained} are not in the local cache (runs are offline)"
        )
