"""glibc malloc settings for training on a CPU: reuse freed tensor memory instead of unmapping it."""

from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD_BYTES = 1 << 30
# The same two settings for a process started later (a notebook kernel), which glibc reads from
# its environment when it starts.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
}


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the OS.

    By default glibc maps big blocks with mmap and unmaps them when freed, so a training step's
    activation and gradient buffers (conv1's maps at batch 128 are 128 x 32 x 28 x 28 floats,
    12.8 MB) can come back as fresh pages that fault in one by one, step after step, most visibly
    where several pipelines share a process, as in `make bench`. With a fixed mmap threshold and
    a high trim threshold the buffers are reused. Returns False, and changes nothing, where the
    C library is not glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
