"""Transfer counters, shared by a worker's threads and published as a small JSON file.

vLLM runs the connector's worker side in its own process (the multiproc
executor's Worker), not in the process that holds the AsyncLLM the router or
a worker server talks to. So the counters are written, atomically and at most
a few times per second, to `stats_path` (chosen by `connector_config`), and
`read_stats(path)` reads them from any process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

COUNTER_NAMES = (
    "bytes_sent",
    "bytes_received",
    "transfers_sent_ok",
    "transfers_sent_failed",
    "transfers_loaded_ok",
    "transfers_loaded_sync",  # of those, loaded in the step that admitted the request (kvtransfer.arrivals)
    "transfers_loaded_failed",
    "transfers_received_failed",
    "frames_refused",
    "lease_expiries",
    "load_timeouts",
)


class Stats:
    """Thread-safe counters; `flush()` writes them to `path` when they changed."""

    def __init__(self, path: str | os.PathLike | None = None, *, min_interval_s: float = 0.2) -> None:
        self.path = Path(path) if path else None
        self._values: dict[str, int] = {name: 0 for name in COUNTER_NAMES}
        self._lock = threading.Lock()
        self._dirty = True
        self._last_flush_s = 0.0
        self._min_interval_s = min_interval_s

    def add(self, name: str, amount: int = 1) -> None:
        if name not in self._values:
            raise KeyError(f"unknown counter {name!r}; known: {COUNTER_NAMES}")
        with self._lock:
            self._values[name] += amount
            self._dirty = True

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def flush(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if not (self._dirty or force) or (not force and now - self._last_flush_s < self._min_interval_s):
                return
            values = dict(self._values)
            self._dirty = False
            self._last_flush_s = now
        payload = {"pid": os.getpid(), "time_s": time.time(), **values}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, self.path)
        except OSError:
            pass  # stats are best effort; never fail a transfer for them


def rank_stats_path(path: str | os.PathLike, rank: int) -> Path:
    """The counters file of tensor-parallel rank `rank` (rank 0: `path` itself)."""
    path = Path(path)
    return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Counters a connector published at `path`, summed over its tensor-parallel
    ranks (each rank moves its own shard, so with TP=n one request counts n
    transfers); all zero if nothing was written yet."""
    path = Path(path)
    totals = dict.fromkeys(COUNTER_NAMES, 0)
    meta: dict[str, Any] = {}
    for index, file in enumerate([path, *sorted(path.parent.glob(f"{path.name}.rank*"))]):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        for name in COUNTER_NAMES:
            totals[name] += int(data.get(name, 0))
        if index == 0:
            meta = {k: data[k] for k in ("pid", "time_s") if k in data}
    return totals | meta
