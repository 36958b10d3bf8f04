"""pipeline.heap: glibc's thresholds are set for the run, and left alone when asked."""

import subprocess
import sys

import pytest

from pipeline import heap

PROBE = """
from pipeline import heap
print(heap.release_big_blocks())
"""


def _probe(env: dict) -> str:
    import os

    full = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(heap._libc() is None, reason="not glibc")
def test_set_on_glibc_and_left_alone_when_asked():
    assert _probe({"MEMSIEVE_MALLOC": "", "GLIBC_TUNABLES": ""}) == "True"
    assert _probe({"MEMSIEVE_MALLOC": "tight", "GLIBC_TUNABLES": ""}) == "True"
    assert _probe({"MEMSIEVE_MALLOC": "default"}) == "False"
    assert _probe({"MEMSIEVE_MALLOC": "", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == "False"


@pytest.mark.skipif(heap._libc() is None, reason="not glibc")
def test_a_freed_big_block_leaves_the_process():
    """64 blocks of 8 MB (under glibc's 32 MB dynamic ceiling), each followed by a small block
    that stays: freed, they stay resident by default and leave the process with the thresholds."""
    code = """
import os
from pipeline import heap
if os.environ.get("SET") == "1":
    heap.release_big_blocks()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
big = libc.malloc(16 << 20)
libc.free(big)  # raises glibc's dynamic threshold to 16 MB
base = rss()
blocks, pins = [], []
for _ in range(64):  # each block followed by a small live allocation: freed blocks are holes
    blocks.append(libc.malloc(8 << 20))
    ctypes.memset(blocks[-1], 1, 8 << 20)
    pins.append(libc.malloc(64 << 10))
for b in blocks:
    libc.free(b)
print((rss() - base) >> 20)
"""
    import os

    def held(flag: str) -> int:
        # glibc's MALLOC_*_ variables fix its thresholds (dask's nanny puts MALLOC_TRIM_THRESHOLD_ in
        # the launching process's environment, so after the Dask tests the suite's children inherit it)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(SET=flag, MEMSIEVE_MALLOC="", GLIBC_TUNABLES="")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert held("1") < 64 <= held("0")  # MB still resident after the frees
