"""Let a receiving process reuse the memory of frames it already freed.

ZeroMQ mallocs every received frame in its I/O thread. With glibc's defaults
a frame above the (dynamic, at most 32 MiB) mmap threshold gets a fresh mmap
and goes back with munmap, and freed heap memory above M_TRIM_THRESHOLD goes
back to the kernel too. A receiver that holds a whole transfer until decode
claims it frees its frames in bulk, so the next transfer faults every page in
again (the kernel zeroes each one): in benchmarks/kvtransfer_throughput that
cost a holding receiver 30-70 % of its throughput against one that drops
each frame at once.

`keep_freed_memory` pins the mmap threshold at its maximum (the sender keeps
each chunk below it, see protocol.MAX_CHUNK_BYTES) and raises the trim
threshold to the receiver's buffer bound (or switches trimming off past 2 GiB,
which mallopt's int cannot express), so freed frames stay mapped and the next
transfer reuses them.
It also caps malloc at one arena for threads started from now on: ZeroMQ's
I/O thread would otherwise get an arena of its own, made of 64 MiB heaps that
glibc unmaps as soon as they are empty, whatever the thresholds say (measured:
1.05 M page faults for 5 GB received, 66 k with one arena). The receiver
creates its own ZeroMQ context after this call so that thread is born under it.
The memory kept this way is bounded by what the process held at its peak,
which the Assembler already bounds with max_buffer_bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and glibc's ceiling for the mmap threshold on 64-bit.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_INT_MAX = 2**31 - 1

_lock = threading.Lock()
_applied: int | None = None


def trim_threshold(max_kept_bytes: int) -> int:
    """M_TRIM_THRESHOLD for a process that may hold max_kept_bytes: -1 (never trim)
    past what mallopt's int can say. Capping it at INT_MAX instead made glibc
    hand back every page of a transfer over 2 GiB when it was freed."""
    if max_kept_bytes >= _INT_MAX:
        return -1
    return max(MMAP_THRESHOLD_MAX, int(max_kept_bytes))


def _covers(applied: int, trim: int) -> bool:
    return applied == -1 or (trim != -1 and applied >= trim)


def keep_freed_memory(max_kept_bytes: int) -> bool:
    """Tune this process's glibc malloc; False (and nothing changed) elsewhere.

    Idempotent: a later call with a larger bound raises the trim threshold.
    """
    global _applied
    trim = trim_threshold(max_kept_bytes)
    with _lock:
        if _applied is not None and _covers(_applied, trim):
            return True
        mallopt = _glibc_mallopt()
        if mallopt is None:
            return False
        ok = all(
            mallopt(param, value) == 1
            for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, trim), (M_ARENA_MAX, 1))
        )
        if ok:
            _applied = trim
        else:
            logger.warning("kvtransfer: mallopt refused; received frames will be re-faulted for every transfer")
        return ok


def _glibc_mallopt():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has mallopt with these meanings
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
