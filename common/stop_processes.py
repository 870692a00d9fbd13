"""Stopping a set of processes that is found again on every look (a cgroup's, a namespace's)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable


def stop_all(list_pids: Callable[[], list[int]], timeout_s: float, poll_s: float = 0.2) -> list[int]:
    """SIGTERM what `list_pids` finds, SIGKILL after half the timeout, until it finds nothing.

    Returns the pids still there at the deadline (empty when all are gone).
    """
    deadline = time.monotonic() + timeout_s
    sig = signal.SIGTERM
    while (pids := list_pids()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(poll_s)
        if time.monotonic() > deadline - timeout_s / 2:
            sig = signal.SIGKILL
    return list_pids()
