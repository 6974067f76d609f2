"""The malloc settings that keep freed tensor memory for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Where does glibc put a 12.8 MB block (conv1's maps at batch 128)? On the brk heap, where freed
# memory stays mapped for reuse, or in a mapping of its own, unmapped again when freed?
PROBE = """
import ctypes, sys
if sys.argv[1] == "tuned":
    from mnistlab.allocator import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(128 * 32 * 28 * 28 * 4)
heap = [line for line in open("/proc/self/maps") if "[heap]" in line]
low, high = (int(x, 16) for x in heap[0].split()[0].split("-"))
print(low <= block < high)
"""


def block_on_heap(mode: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_big_blocks_come_from_the_heap_once_tuned():
    assert not block_on_heap("default")  # glibc maps it apart, and unmaps it when freed
    assert block_on_heap("tuned")
