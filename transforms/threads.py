"""Named helper-thread pools of the process, created once and shared by every stage that uses them.

Work handed to them is numpy, Arrow or Parquet work that releases the GIL (a shard's parts
written while the next shard is built, MT19937 seeding in batches, a shard's caption words
counted while it is decided), so a stage uses a second core where the machine has one. Callers
wait for their futures before their bundle ends; nothing here outlives a bundle's outputs.
"""

from __future__ import annotations

import threading

_POOLS: dict = {}
_LOCK = threading.Lock()


def pool(name: str, threads: int = 2):
    """The process's ``ThreadPoolExecutor`` called ``name`` (``threads`` workers, fixed when first made)."""
    with _LOCK:
        if name not in _POOLS:
            from concurrent.futures import ThreadPoolExecutor

            _POOLS[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
        return _POOLS[name]
