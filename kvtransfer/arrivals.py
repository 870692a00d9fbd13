"""Which transfers a decode engine holds complete, told to its scheduler.

The receiver runs in vLLM's worker process, the scheduler-side connector in
EngineCore, another process on the same host. When the scheduler admits a
decode request whose KV has already arrived, it can load it synchronously:
the worker copies it in before the forward pass of that same step, and the
first token comes one engine step sooner than through vLLM's asynchronous
load path (park in WAITING_FOR_REMOTE_KVS, load, reschedule next step).

So the receiver marks each transfer it completes and unmarks it once it is
claimed and released, dropped or expired; the scheduler only reads marks.
A mark is an empty file named by a hash of the transfer id (ids come off the
wire: never a path) in one folder per receiving endpoint, in shared memory
where the host has it. A mark can only be stale for the few milliseconds
between a lease ending and the receiver's next expiry pass; a synchronous
load that then finds nothing reports its blocks invalid and vLLM recomputes
them, as for any failed load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_SHARED_MEMORY = Path("/dev/shm")


def arrivals_dir(endpoint: str) -> Path:
    """The folder of marks for the receiver bound at `endpoint` (one per TP/PP rank)."""
    root = _SHARED_MEMORY if _SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())
    key = hashlib.blake2b(endpoint.encode(), digest_size=8).hexdigest()
    return root / f"hexserve-kv-arrivals-{os.getuid()}" / key


def _mark_name(transfer_id: str) -> str:
    return hashlib.blake2b(transfer_id.encode(), digest_size=12).hexdigest()


def mark_path(endpoint: str, transfer_id: str) -> Path:
    return arrivals_dir(endpoint) / _mark_name(transfer_id)


def has_arrived(endpoint: str, transfer_id: str) -> bool:
    """True if the receiver at `endpoint` holds transfer `transfer_id` complete and unclaimed."""
    return mark_path(endpoint, transfer_id).exists()


class ArrivalMarks:
    """The receiver's side: marks and unmarks. Best effort: a failure only costs the fast path."""

    def __init__(self, endpoint: str) -> None:
        self.dir = arrivals_dir(endpoint)
        self._marked: set[str] = set()
        self._mark_failed = False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.iterdir():  # a previous receiver on this endpoint
                stale.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("kvtransfer: no arrival marks in %s (%s); decode loads asynchronously", self.dir, exc)

    def mark(self, transfer_id: str) -> None:
        try:
            (self.dir / _mark_name(transfer_id)).touch()
            self._marked.add(transfer_id)
        except OSError:
            # The request still loads, asynchronously; say so once, not per transfer.
            if not self._mark_failed:
                logger.warning("kvtransfer: cannot mark arrivals in %s; decode loads asynchronously", self.dir, exc_info=True)
            self._mark_failed = True

    def unmark(self, transfer_id: str) -> None:
        if transfer_id in self._marked:
            self._marked.discard(transfer_id)
            (self.dir / _mark_name(transfer_id)).unlink(missing_ok=True)

    def clear(self) -> None:
        """Unmark everything and remove the folder (the receiver is closing)."""
        for transfer_id in list(self._marked):
            self.unmark(transfer_id)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # not empty (another receiver on this endpoint) or already gone
