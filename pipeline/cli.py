"""The ``memsieve`` command line (docs/contract.md). Exit codes: 0 done, 1 run failed, 2 bad usage/config.

Logs go to stderr (one line per record, ISO-8601 UTC); ``run`` and ``decide`` end with one
JSON line on stdout (counts, decisions, output, seconds) for schedulers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("memsieve")


def _version() -> str:
    try:
        from memsieve import __version__
    except ImportError:  # an install made before the memsieve package existed
        from importlib.metadata import version

        return version("memsieve")
    return __version__


def _log_options() -> argparse.ArgumentParser:
    """The logging options, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("logging")
    group.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="memsieve's level (default info); debug also shows every library's records",
    )
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as --log-level debug")
    group.add_argument("--log-file", default=argparse.SUPPRESS, metavar="PATH", help="also append the log to PATH")
    group.add_argument(
        "--progress",
        choices=["auto", "bars", "lines", "off"],
        default=argparse.SUPPRESS,
        help="bars on a terminal, log lines otherwise (auto)",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _log_options()
    parser = argparse.ArgumentParser(prog="memsieve", description=__doc__, parents=[common])
    parser.add_argument("--version", action="version", version=f"memsieve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run a job (unknown options pass through to Beam)")
    run.add_argument("job")
    run.add_argument("--input", help="glob of .tar shards, or a LAION-layout embeddings folder")
    run.add_argument("--output", help="output folder")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    val = sub.add_parser("validate", parents=[common], help="check a job file and print the resolved config")
    val.add_argument("job")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dec = sub.add_parser("decide", parents=[common], help="re-decide a finished run from its stored annotations")
    dec.add_argument("run_dir")
    dec.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dec.add_argument("--output", metavar="NEW", help="write the new decision set to NEW; RUN_DIR is left as it is")
    dec.add_argument("--dry-run", action="store_true", help="print the changes (by decision and reason), write nothing")
    init = sub.add_parser("init", parents=[common], help="write a starter job file into a folder")
    init.add_argument("dir")
    init.add_argument("--input", help="glob of the shards the job reads (default DIR/shards/*.tar)")
    init.add_argument("--force", action="store_true", help="overwrite an existing job.yaml")
    try:
        from pipeline.probe_cli import add_probe_parsers
    except ImportError:
        pass
    else:
        add_probe_parsers(sub)
    return parser


def _setup(args) -> None:
    from pipeline import logs, progress

    level = getattr(args, "log_level", None) or ("debug" if getattr(args, "verbose", False) else "info")
    logs.setup(level, getattr(args, "log_file", None), quiet=getattr(args, "quiet", False))
    mode = getattr(args, "progress", "auto")
    if getattr(args, "quiet", False) and mode == "auto":
        mode = "off"
    bars = {"auto": None, "bars": True}.get(mode, False)
    progress.configure("lines" if mode in ("auto", "bars") else mode, bars=bars)


def emit_summary(record: dict) -> None:
    """The scheduler's line: one JSON object, last on stdout."""
    sys.stdout.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def cmd_validate(args) -> int:
    from pipeline.config import load_job

    cfg = load_job(args.job, args.set)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return EXIT_OK


def cmd_run(args, beam_args: list[str]) -> int:
    from pipeline import logs
    from pipeline.config import load_job
    from pipeline.job import RunFailed, run_job

    started = time.time()
    cfg = load_job(args.job, args.set, input_path=args.input, output_dir=args.output)
    out = cfg.output.dir if "://" in cfg.output.dir else os.path.abspath(cfg.output.dir)
    record = {"command": "run", "job": cfg.name, "output": out}
    try:
        info = run_job(cfg, logs.beam_log_args(beam_args))
    except RunFailed as exc:
        log.error("run failed: %s", exc)
        emit_summary(dict(record, status="failed", exit_code=EXIT_FAILED, error=str(exc), seconds=_since(started)))
        return EXIT_FAILED
    emit_summary(dict(record, status="ok", exit_code=EXIT_OK, seconds=_since(started), **_counts(info)))
    return EXIT_OK


def _since(started: float) -> float:
    return round(time.time() - started, 3)


def _counts(info: dict) -> dict:
    summary = info.get("summary", {})
    return {
        "keys": summary.get("keys", 0),
        "ok": summary.get("ok", 0),
        "failed": summary.get("failed", 0),
        "decisions": summary.get("decisions", {}),
        "blocklist_urls": info.get("outputs", {}).get("blocklist_urls", 0),
        "stages_s": {k: v.get("seconds") for k, v in info.get("stages", {}).items()},
    }


def cmd_decide(args) -> int:
    from pipeline.config import check_decide_overrides
    from pipeline.redecide import redecide

    check_decide_overrides(args.set)
    started = time.time()
    if args.dry_run:
        from pipeline.redecide_dry import dry_run, format_changes

        changes = dry_run(args.run_dir, args.set)
        print(format_changes(changes))
        emit_summary(dict(command="decide", status="dry_run", exit_code=EXIT_OK, seconds=_since(started), **changes))
        return EXIT_OK
    run = redecide(args.run_dir, args.set, output=args.output)
    out = args.output or args.run_dir
    record = dict(command="decide", status="ok", exit_code=EXIT_OK, output=out, seconds=_since(started))
    counts = _counts(run)
    counts.pop("stages_s")  # the run's stages, not this command's
    emit_summary(dict(record, **counts))
    return EXIT_OK


def cmd_init(args) -> int:
    from memsieve.starter import write_starter_job

    path = write_starter_job(args.dir, input_glob=args.input, force=args.force)
    print(f"wrote {path}; check it with: memsieve validate {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads unless the user sets HF_HUB_OFFLINE=0
    from pipeline import gc_tuning

    gc_tuning.freeze_at_exit()  # the process's last act: no cycle search through the heap at shutdown
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    _setup(args)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from pipeline.config import ConfigError

    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "run":
            return cmd_run(args, extra)
        if args.command == "decide":
            return cmd_decide(args)
        if args.command == "init":
            return cmd_init(args)
        return args.func(args)
    except ConfigError as exc:
        print(f"memsieve: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
