"""Logging for people and schedulers: stderr, one line per record, ISO-8601 UTC timestamps.

memsieve's own loggers log at the chosen level; every other library (Beam, diffusers,
transformers, urllib3, ...) only from WARNING, unless the level is ``debug``. Hugging Face
libraries keep their own handlers and progress bars; ``quiet_hf`` routes their records through
ours and turns their bars off (called where they are imported, so nothing is imported early).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys

OURS = ("memsieve", "pipeline", "transforms", "schemas", "scripts")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_debug = False
_configured = False
ENV_LEVEL = "MEMSIEVE_LOG_LEVEL"  # set by the CLI: worker processes it starts format their lines too


class OneLineFormatter(logging.Formatter):
    """``2026-11-29T23:40:01.123Z INFO memsieve.progress: ...``; newlines (tracebacks) as `` | ``."""

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def format(self, record):
        return super().format(record).replace("\r", "").replace("\n", " | ")


# advice that a user of memsieve cannot act on (not failures): dropped unless --log-level debug
NOISE = (
    "apitools not found",  # Beam's GCP extras, absent on purpose without the [gcp] extra
    "`accelerate` was not found",  # diffusers: memsieve loads small or fully materialised models
)


class NoiseFilter(logging.Filter):
    def filter(self, record):
        if _debug:
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(n in message for n in NOISE)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (rich's live bars redirect it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it
        pass


def setup(level: str = "info", log_file: str | None = None, quiet: bool = False) -> None:
    """Configure the root logger once per process (the CLI calls it first thing)."""
    global _debug, _configured
    _configured = True
    name = "warning" if quiet and level == "info" else level
    os.environ[ENV_LEVEL] = name
    ours = LEVELS[name]
    _debug = ours <= logging.DEBUG
    formatter = OneLineFormatter(FORMAT)
    handlers: list[logging.Handler] = [StderrHandler()]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(formatter)
        h.addFilter(NoiseFilter())
    logging.basicConfig(level=logging.DEBUG if _debug else logging.WARNING, handlers=handlers, force=True)
    for logger in OURS:
        logging.getLogger(logger).setLevel(ours)
    logging.captureWarnings(True)
    # Hugging Face libraries read these when first imported (here, in Beam workers, everywhere)
    verbosity = "info" if _debug else "warning"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", verbosity)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", verbosity)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not _debug:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


def quiet_hf(load: bool = False) -> None:
    """transformers/diffusers records through our handlers, their bars off. ``load``: import their
    logging modules now (call it before loading a model); otherwise only those already imported."""
    for module in ("transformers", "diffusers"):
        if not load and sys.modules.get(module) is None:
            continue
        try:
            hf_logging = __import__(f"{module}.utils.logging", fromlist=["logging"])
            hf_logging.disable_default_handler()
            hf_logging.enable_propagation()
            hf_logging.set_verbosity(logging.DEBUG if _debug else logging.WARNING)
            if not _debug:
                hf_logging.disable_progress_bar()
        except Exception:  # an older or newer API: their own handler stays
            continue


def adopt_in_worker() -> None:
    """In a worker process the CLI started (the multiprocess DirectRunner): Beam configured its
    logging; keep its handlers (they may ship records to the runner) but give them our one-line
    ISO format and noise filter. Nothing happens in the driver or on remote workers."""
    global _configured, _debug
    if _configured or ENV_LEVEL not in os.environ:
        return
    _configured = True
    _debug = os.environ[ENV_LEVEL] == "debug"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLineFormatter(FORMAT))
        handler.addFilter(NoiseFilter())


def beam_log_args(beam_args: list[str]) -> list[str]:
    """Beam's own worker logging at WARNING (ours at our level) unless the user set it."""
    if any(a.startswith(("--default_sdk_harness_log_level", "--sdk_harness_log_level_overrides")) for a in beam_args):
        return list(beam_args)
    level = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR"}[
        os.environ.get(ENV_LEVEL, "info")
    ]
    if level == "DEBUG":
        return list(beam_args)
    overrides = json.dumps({name: level for name in OURS}, separators=(",", ":"))
    return [*beam_args, "--default_sdk_harness_log_level=WARNING", f"--sdk_harness_log_level_overrides={overrides}"]
