"""``memsieve decide RUN --output NEW``: a new run folder beside RUN, which stays byte-identical.

NEW receives hard links of RUN's unchanged tables (annotations, clusters, scores, ...) and
report thumbnails, so it is a complete run folder (its report and a later re-decide read them)
while costing no copy on the same file system. Every file memsieve writes into NEW is written
under a temporary name and renamed, so a linked file is replaced, never modified in place:
RUN's copies do not change.
"""

from __future__ import annotations

import os
import shutil

from pipeline.config import ConfigError

DECIDED = ("manifest", "diversify", "blocklist", "filtered")
FILES = ("run.json",)


def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _link_tree(src: str, dst: str) -> None:
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(root, src)
        for name in sorted(files):
            if ".tmp-" in name:
                continue
            _link_or_copy(os.path.join(root, name), os.path.join(dst, rel, name))


def prepare_output(run_dir: str, new: str) -> None:
    """Fill NEW with what the re-decide does not rewrite. NEW must be absent or empty."""
    from pipeline.job import RUN_TABLES

    run_abs, new_abs = os.path.abspath(run_dir), os.path.abspath(new)
    if new_abs.startswith(run_abs + os.sep):
        raise ConfigError(f"--output: {new} is inside the run {run_dir}; choose a folder beside it")
    if os.path.exists(new_abs) and (not os.path.isdir(new_abs) or os.listdir(new_abs)):
        raise ConfigError(f"--output: {new} exists and is not an empty folder")
    os.makedirs(new_abs, exist_ok=True)
    for table in RUN_TABLES:
        if table.split("/")[0] in DECIDED:
            continue
        src = os.path.join(run_abs, table)
        if os.path.isdir(src):
            _link_tree(src, os.path.join(new_abs, table))
    report = os.path.join(run_abs, "report")
    if os.path.isdir(report):  # thumbnails and figures are reused; index.html is written anew
        _link_tree(report, os.path.join(new_abs, "report"))
        index = os.path.join(new_abs, "report", "index.html")
        if os.path.exists(index):
            os.remove(index)
    for name in FILES:
        src = os.path.join(run_abs, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(new_abs, name))
