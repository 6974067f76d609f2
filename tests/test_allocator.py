"""The malloc settings that keep freed tensor memory for reuse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mnistlab.tools.allocator import MALLOC_ENV

# Where does glibc put a 12.8 MB block (conv1's maps at batch 128)? On the brk heap, where freed
# memory stays mapped for reuse, or in a mapping of its own, unmapped again when freed?
PROBE = """
import ctypes, sys
if sys.argv[1] == "tuned":
    from mnistlab.tools.allocator import keep_freed_memory
    assert keep_freed_memory()
elif sys.argv[1] == "imported":
    import mnistlab.data, mnistlab.model, mnistlab.train
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(128 * 32 * 28 * 28 * 4)
heap = [line for line in open("/proc/self/maps") if "[heap]" in line]
low, high = (int(x, 16) for x in heap[0].split()[0].split("-"))
print(low <= block < high)
"""


def block_on_heap(mode: str, env: dict[str, str] | None = None) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_big_blocks_come_from_the_heap_once_tuned():
    assert not block_on_heap("default")  # glibc maps it apart, and unmaps it when freed
    assert block_on_heap("tuned")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_importing_the_package_changes_no_malloc_setting_and_kernels_get_them_by_environment():
    assert not block_on_heap("imported")  # a student's kernel is left as it was
    assert block_on_heap("default", MALLOC_ENV)  # what make report gives its notebook kernels
