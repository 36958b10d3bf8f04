"""The output folder's safety checks, lock and commit protocol (docs/engines.md, "Outputs").

A run never writes its tables, report or ``run.json`` into OUT directly. It writes them into
``OUT/_staging/<run id>/``; only a finished run is committed:

1. everything, ``run.json`` included, is complete in the staging folder;
2. a ``_COMMITTING`` marker is written there (the point of no return: a killed commit is
   finished by the next run or re-decide on OUT, never undone);
3. OUT's ``run.json`` is moved into ``_staging/<id>/previous/``: from here until step 6 OUT has no
   ``run.json``, so a reader sees "no finished run", never a mix;
4. each old product (tables, ``filtered/``, ``report/``, ``blocklist.txt``) is moved into
   ``previous/``, then a ``_OLD_MOVED`` marker is written;
5. each new product is moved from the staging folder into OUT;
6. the new ``run.json`` is moved into OUT (last), and the staging folder is deleted.

On local disk every move is one atomic ``rename``. On an object store a move is copy + delete per
object: single objects (``run.json``, each Parquet part) still appear whole, and ``run.json``
appears last, but a folder's objects arrive one by one during steps 4-5.

The cache (``OUT/cache``, content-keyed) and persisted embeddings (``OUT/embeddings``) are shared
by runs and stay outside the staging folder: a killed run's finished shards are reused.

Before anything is written: OUT must not be a file, must not hold the input, and may hold only
what memsieve writes. A lock file (``OUT/_lock``) refuses a second run on the same output (exit 2
naming the holder's pid and host); a lock left by a dead process on this host is taken over.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import socket
import time

from pipeline.config import ConfigError
from schemas import arrow
from transforms import fsio

log = logging.getLogger(__name__)

STAGING, LOCK, MARKER = "_staging", "_lock", ".memsieve"
COMMITTING, OLD_MOVED, PREVIOUS, DIAGNOSTICS = "_COMMITTING", "_OLD_MOVED", "previous", "diagnostics.json"
TABLES = [
    "manifest",
    "annotations",
    "failures",
    "clusters",
    "neighbours",
    "triggers/keywords",
    "triggers/objects",
    "scores",
    "diversify",
    "blocklist",
    "shards",
]
TABLES += [t for t in arrow.TABLES if t not in TABLES]  # a table added to the schemas is committed too
# run.json is committed last, apart
PRODUCTS = TABLES + ["filtered", "report", "blocklist.txt", "blocklist.tsv", "blocklist.json"]
SHARED = ["cache", "embeddings"]
KNOWN = {p.split("/")[0] for p in PRODUCTS} | set(SHARED) | {"run.json", STAGING, LOCK, MARKER}
KNOWN_PATTERNS = ["run.json.redecide", "*.tmp-*", "*.old-*"]  # re-decide's own staging names


def _is_known(name: str) -> bool:
    return name in KNOWN or any(fnmatch.fnmatch(name, p) for p in KNOWN_PATTERNS)


def check_output(out_dir: str, inputs: list[str]) -> None:
    """Refuse (ConfigError, exit 2) an output that is a file, holds the input, or holds files
    memsieve did not write. Reads only."""
    try:
        if fsio.isfile(out_dir):
            raise ConfigError(f"output.dir: {out_dir} is a file, not a folder")
        names = fsio.listdir(out_dir)
    except OSError as exc:
        raise ConfigError(f"output.dir: cannot read {out_dir}: {exc.strerror or exc}") from None
    root = out_dir.rstrip("/") + "/"
    inside = [p for p in inputs if p.startswith(root) or p.rstrip("/") == out_dir.rstrip("/")]
    if inside:
        raise ConfigError(
            f"output.dir: {out_dir} contains the input ({inside[0]}); memsieve replaces what is in its "
            "output folder: choose an output folder apart from the shards"
        )
    if not names:
        return
    unknown = [n for n in names if not _is_known(n)]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(
            f"output.dir: {out_dir} holds files memsieve did not write ({shown}); "
            "choose an empty or new folder, or an earlier memsieve output"
        )
    if not ({"run.json", MARKER, LOCK, STAGING} & set(names)):
        raise ConfigError(
            f"output.dir: {out_dir} is not empty and is not a memsieve output (no run.json or {MARKER}); "
            "choose an empty or new folder"
        )


# ----------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``OUT/_lock``: {pid, host, run_id, started}. Local: created with O_EXCL (atomic). Object
    stores: written if absent and read back (best effort: two runs starting in the same second
    may both see no lock)."""

    def __init__(self, out_dir: str, run_id: str):
        self.path = fsio.join(out_dir, LOCK)
        self.out_dir = out_dir
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started": time.time()}

    def _holder(self) -> dict | None:
        try:
            return json.loads(fsio.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": -1, "host": "?", "run_id": "unreadable lock"}

    def _refuse_or_clear(self, holder: dict) -> None:
        same_host = holder.get("host") == self.record["host"]
        pid = int(holder.get("pid") or -1)
        if same_host and pid > 0 and not _pid_alive(pid):
            log.warning("output %s: taking over the lock of pid %d (no longer running)", self.out_dir, pid)
            fsio.remove(self.path)
            return
        raise ConfigError(
            f"output.dir: {self.out_dir} is locked by another run (pid {pid} on host {holder.get('host')}, "
            f"run {holder.get('run_id')}); wait for it, or delete {self.path} if that run is gone"
        )

    def acquire(self) -> None:
        data = json.dumps(self.record).encode()
        try:
            fsio.makedirs(self.out_dir)
            for _ in range(3):
                holder = self._holder()
                if holder is not None:
                    self._refuse_or_clear(holder)
                    continue
                if self._create(data):
                    return
            raise ConfigError(f"output.dir: {self.out_dir}: could not take the lock {self.path}")
        except OSError as exc:
            raise ConfigError(f"output.dir: {self.out_dir} is not writable: {exc.strerror or exc}") from None

    def _create(self, data: bytes) -> bool:
        if not fsio.is_remote(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        fsio.write_bytes(self.path, data)
        return (self._holder() or {}).get("run_id") == self.record["run_id"]

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if (self._holder() or {}).get("run_id") == self.record["run_id"]:
                fsio.remove(self.path)


# ----------------------------------------------------------------------------- staging and commit


def fault_point(name: str) -> None:
    """Tests only (tests/test_commit.py): ``MEMSIEVE_FAULT_AT=name`` SIGKILLs the run here."""
    if os.environ.get("MEMSIEVE_FAULT_AT") == name:
        import signal

        log.warning("MEMSIEVE_FAULT_AT=%s: killing this run", name)
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def recover(out_dir: str) -> None:
    """Under the lock: finish a commit that a kill interrupted, drop stale staging folders and
    half-built cache entries (all written by earlier memsieve runs on this output)."""
    from transforms import shard_cache

    root = fsio.join(out_dir, STAGING)
    for run_id in fsio.listdir(root):
        stage = fsio.join(root, run_id)
        if fsio.exists(fsio.join(stage, COMMITTING)):
            log.warning("output %s: finishing the interrupted commit of run %s", out_dir, run_id)
            commit(out_dir, stage)
        else:
            fsio.remove(stage)
    shard_cache.clear_temporaries(fsio.join(out_dir, "cache"))


def commit(out_dir: str, stage: str) -> None:
    """Steps 2-6 of the protocol (idempotent: a second call finishes a killed first one)."""
    marker = fsio.join(stage, COMMITTING)
    if not fsio.exists(marker):
        new = [p for p in PRODUCTS if fsio.exists(fsio.join(stage, p))]
        fsio.write_text(marker, json.dumps({"products": new}))
    previous = fsio.join(stage, PREVIOUS)
    if not fsio.exists(fsio.join(stage, OLD_MOVED)):
        for name in ["run.json"] + PRODUCTS:
            if fsio.exists(fsio.join(out_dir, name)):
                fsio.rename(fsio.join(out_dir, name), fsio.join(previous, name))
        fsio.write_text(fsio.join(stage, OLD_MOVED), "")
    fault_point("commit")
    for name in PRODUCTS:
        if fsio.exists(fsio.join(stage, name)):
            fsio.rename(fsio.join(stage, name), fsio.join(out_dir, name))
    if fsio.exists(fsio.join(stage, "run.json")):
        fsio.rename(fsio.join(stage, "run.json"), fsio.join(out_dir, "run.json"))
    fsio.remove(stage)
    if not fsio.listdir(fsio.join(out_dir, STAGING)):
        fsio.remove(fsio.join(out_dir, STAGING))


def write_diagnostics(stage: str, info: dict, reason: str) -> str:
    """A failed run's summary goes to its staging folder (kept for inspection until the next run),
    never to OUT/run.json."""
    path = fsio.join(stage, DIAGNOSTICS)
    fsio.write_text(path, json.dumps(dict(info, failed=reason), indent=2, sort_keys=True, default=str) + "\n")
    return path


@contextlib.contextmanager
def private_tmpdir():
    """The run's temporary files (Beam's and ours) go to one folder under $TMPDIR, deleted at the
    end whatever happens: nothing is left in $TMPDIR, even after a full disk or an exception."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="memsieve-run-")
    saved_env, saved_default = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_default
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def locked(out_dir: str, run_id: str = ""):
    """Hold OUT's lock (exit 2 when another live run holds it), after finishing any commit a
    kill interrupted; yields the run id."""
    run_id = run_id or new_run_id()
    lock = OutputLock(out_dir, run_id)
    lock.acquire()
    try:
        if not fsio.exists(fsio.join(out_dir, MARKER)) and not fsio.exists(fsio.join(out_dir, "run.json")):
            fsio.write_text(fsio.join(out_dir, MARKER), "memsieve output folder\n")
        recover(out_dir)
        yield run_id
    finally:
        lock.release()


@contextlib.contextmanager
def claim(out_dir: str, inputs: list[str]):
    """Check (nothing written yet), lock, recover; yields (run id, staging folder)."""
    check_output(out_dir, inputs)
    with locked(out_dir) as run_id:
        stage = fsio.join(out_dir, STAGING, run_id)
        fsio.makedirs(stage)
        yield run_id, stage
