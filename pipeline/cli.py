"""The ``memsieve`` command line (contract.md). Exit codes: 0 done, 1 run failed, 2 bad usage/config."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        fmt = "%(message)s"
    except ImportError:  # rich is a dependency; this is only a guard
        handler, fmt = logging.StreamHandler(), "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, handlers=[handler], force=True)
    for ours in ("memsieve", "pipeline", "transforms", "scripts"):
        logging.getLogger(ours).setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsieve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (unknown options pass through to Beam)")
    run.add_argument("job")
    run.add_argument("--input", help="glob of .tar shards, or a LAION-layout embeddings folder")
    run.add_argument("--output", help="output folder")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    val = sub.add_parser("validate", help="check a job file and print the resolved config")
    val.add_argument("job")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dec = sub.add_parser("decide", help="re-decide a finished run from its stored annotations")
    dec.add_argument("run_dir")
    dec.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    try:
        from pipeline.probe_cli import add_probe_parsers
    except ImportError:
        pass
    else:
        add_probe_parsers(sub)
    return parser


def cmd_validate(args) -> int:
    import json

    from pipeline.config import load_job

    cfg = load_job(args.job, args.set)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return EXIT_OK


def cmd_run(args, beam_args: list[str]) -> int:
    from pipeline.config import load_job
    from pipeline.job import RunFailed, run_job

    cfg = load_job(args.job, args.set, input_path=args.input, output_dir=args.output)
    try:
        info = run_job(cfg, beam_args)
    except RunFailed as exc:
        logging.getLogger("memsieve").error("run failed: %s", exc)
        return EXIT_FAILED
    summary = info.get("summary", {})
    print(f"memsieve: {summary.get('keys', 0)} keys, decisions {summary.get('decisions', {})}, output {cfg.output.dir}")
    return EXIT_OK


def cmd_decide(args) -> int:
    from pipeline.config import check_decide_overrides
    from pipeline.redecide import redecide

    check_decide_overrides(args.set)

    redecide(args.run_dir, args.set)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(args.verbose)
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
        return args.func(args)
    except ConfigError as exc:
        print(f"memsieve: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
