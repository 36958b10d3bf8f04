"""The driver's heap: big buffers go back to the OS when freed (glibc ``mallopt``).

Beam's in-process runner holds every stage's output in its own buffers (pickled bytes, then
decoded values for a GroupByKey) and frees them stage by stage. glibc's malloc serves a block of
up to 32 MB from its heap once a block that big has been freed (the dynamic mmap threshold rises
to it), and a freed heap block stays resident: on the 1M x 512 LAION-layout dedup-only job the
process held ~1.7 GB after the reader and ~3.7 GB after the cell search that no buffer held, and
peaked at 8.3-8.7 GB. With blocks of ``MMAP_THRESHOLD`` bytes or more mapped on their own
(unmapped when freed) and up to ``TRIM_THRESHOLD`` of free heap top kept (not returned and
re-grown over and over), the same run peaked at 6.41 GB for 22.5 s of system CPU against 16.5 s,
outputs identical. With every branch of that session merged (the cell search's shuffle split in
parts), 1M rows dedup-only, one run after another: glibc's default 46.9 s / 5.27 GB, an 8 MB threshold (the
default here) 52.8 s / 4.21 GB, 1 MB 67.5 s / 3.97 GB (31.6 s of system CPU against 12.6 s).
``MEMSIEVE_MALLOC=tight`` returns the heap top once 32 MB of it are free:
5.44 GB, but 33 s of system CPU (the top is re-grown and its pages faulted in afresh over and
over) (docs/engines.md, "The in-process runner").

``MEMSIEVE_MALLOC=default`` leaves malloc as it is; ``MEMSIEVE_MALLOC=trim`` instead runs
``malloc_trim`` once a second (+4% CPU at 200k rows, but it cannot return pages shared with live
small blocks; not measured at 1M); an explicit ``GLIBC_TUNABLES`` malloc setting wins. Elsewhere
than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 8 << 20  # bytes: a block this big or bigger is its own mapping (1 MB: 20 s more system CPU at 1M)
TRIM_THRESHOLD = 128 << 20  # bytes of free heap top kept before it is returned
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc if hasattr(libc, "gnu_get_libc_version") else None  # glibc only
    except (OSError, AttributeError):
        return None


def release_big_blocks(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's thresholds for this process; True when they were set."""
    mode = os.environ.get("MEMSIEVE_MALLOC", "")
    if mode == "default":
        return False
    if mode == "tight":  # the heap top is returned once 32 MB of it are free: less RSS, more CPU
        trim_threshold = 32 << 20
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    if ok:
        log.debug("malloc: blocks >= %d bytes mapped on their own, trim past %d", mmap_threshold, trim_threshold)
    return ok


def start_trimmer(interval_s: float = 1.0) -> bool:
    """A daemon thread that hands the heap's free pages back (``malloc_trim``) every
    ``interval_s``: malloc keeps its own thresholds (no extra mappings), freed memory leaves the
    process within a second. True when started."""
    if os.environ.get("MEMSIEVE_MALLOC", "") == "default":
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False

    def loop():
        while True:
            libc.malloc_trim(0)
            threading.Event().wait(interval_s)

    threading.Thread(target=loop, name="memsieve-heap-trim", daemon=True).start()
    return True


def configure() -> bool:
    """The run's malloc setting, as ``MEMSIEVE_MALLOC`` asks: ``trim`` starts the trimmer thread,
    anything else but ``default`` sets the thresholds. True when something was set."""
    if os.environ.get("MEMSIEVE_MALLOC", "") == "trim":
        return start_trimmer()
    return release_big_blocks()
