"""Transfer counters, shared by a connector's threads and published as small JSON files.

Each connector instance counts in its own process: every worker rank (vLLM's
multiproc executor runs them apart from the process holding the AsyncLLM)
and the scheduler side (in EngineCore; it counts the handoffs it refuses).
Each writes its counters, atomically and at most a few times per second, to
its own file next to `stats_path` (chosen by `connector_config`), and
`read_stats(path)` sums them from any process.

Why not vLLM's own channel (`KVConnectorBase_V1.get_kv_connector_stats`
returning a `KVConnectorStats`)? In vLLM 0.32.0 it does reach the AsyncLLM
front end, where engine/worker_server.py already installs a stat logger, but
only as a by-product of engine steps:

- the worker rank's stats are collected only after an executed step
  (vllm/v1/worker/kv_connector_model_runner_mixin.py:102,
  `output.kv_connector_stats = kv_connector.get_kv_connector_stats()` inside
  `_get_kv_connector_output`, the context manager around execute_model), and
  summed over ranks with that step's output
  (vllm/distributed/kv_transfer/kv_connector/utils.py:132-141);
- an idle engine runs no step: EngineCore.step returns at once when
  `not self.scheduler.has_requests()` (vllm/v1/engine/core.py:665), and the
  busy loop blocks on its input queue while `not self.has_work()`
  (core.py:1576);
- the scheduler forwards them only when stats are logged at all: `make_stats`
  returns None unless `self.log_stats` (vllm/v1/core/sched/scheduler.py:2923),
  else puts `kv_connector_stats.to_dict()` into SchedulerStats (2938), which
  AsyncLLM's output handler hands to its stat loggers
  (vllm/v1/engine/async_llm.py:893-902); `vllm.LLM` turns stats off by default
  (vllm/entrypoints/llm.py:226-227).

Our counters move in the connector's I/O threads between and after steps:
an Ack (`transfers_sent_ok`/`_failed`) arrives after the one-token prefill
request has finished, a decode receiver takes bytes, refuses frames and
expires leases while its engine has no request. Through vLLM's channel
those would stay unreported until some later request makes the engine step,
and the router's health counters and the tests would wait on traffic. So
the counters keep their files; the channel is not used.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The folder `default_stats_path` names for one connector's files;
# `remove_stats` removes such a folder once it is empty.
STATS_DIR_PREFIX = "hexserve-kvstats-"
# Where those folders go (default: the temp dir). A launcher names a folder per
# worker here, so that it can remove what a killed worker left (it cannot
# guess the folder's random suffix).
STATS_DIR_ENV = "HEXSERVE_KV_STATS_DIR"

COUNTER_NAMES = (
    "bytes_sent",
    "bytes_received",
    "transfers_sent_ok",
    "transfers_sent_failed",
    "transfers_loaded_ok",
    "transfers_loaded_sync",  # of those, loaded in the step that admitted the request (kvtransfer.arrivals)
    "transfers_loaded_failed",
    "transfers_received_failed",
    "transfers_refused_version",  # decode: the handoff's kv_protocol_version is not ours (scheduler side)
    "transfers_refused_prompt_hash",  # decode: the handoff names another prompt (scheduler side)
    "transfers_missing_prefix",  # decode: prefill skipped blocks decode no longer held (evicted): recomputed
    "frames_refused",
    "lease_expiries",
    "load_timeouts",
    "internal_errors",  # exceptions on the data path (a bug): logged with their traceback
    "stats_write_failures",  # this very file could not be written (logged); counted on the next write
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
        self._write_failing = False  # log a failing file once per streak, not every flush
        self._written = False  # after one write, a folder that is gone was removed on purpose

    def _write_failed(self) -> None:
        # Never fail a transfer for its counters; but say so, and count it.
        if not self._write_failing:
            logger.warning("kvtransfer: cannot write counters to %s", self.path, exc_info=True)
        self._write_failing = True
        self.add("stats_write_failures")  # marks dirty: the next flush tries again

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
            if not self._written:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, self.path)
            self._written = True
        except FileNotFoundError:
            if self._written:  # the owner removed the folder (remove_stats): it stopped, so do we
                self.path = None
                return
            self._write_failed()
            return
        except OSError:
            self._write_failed()
            return
        if self._write_failing:
            logger.warning("kvtransfer: counters written to %s again", self.path)
            self._write_failing = False


def default_stats_path(role: str) -> str:
    """A file in a folder of its own (made at the first write): reading the
    counters lists that folder, never the whole temp dir, and the worker
    removes the folder when it exits (`remove_stats`). The folder is made in
    `$HEXSERVE_KV_STATS_DIR` when its launcher set one, else in the temp dir."""
    folder = f"{STATS_DIR_PREFIX}{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return os.path.join(os.environ.get(STATS_DIR_ENV) or tempfile.gettempdir(), folder, "counters.json")


def rank_stats_path(path: str | os.PathLike, rank: int) -> Path:
    """The counters file of worker rank `rank` (rank 0: `path` itself)."""
    path = Path(path)
    return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")


def scheduler_stats_path(path: str | os.PathLike) -> Path:
    """The counters file of the scheduler side (handoffs it refused)."""
    path = Path(path)
    return path.with_name(f"{path.name}.scheduler")


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Counters a connector published at `path`, summed over its worker ranks
    (each rank moves its own shard, so with TP=n one request counts n
    transfers) and its scheduler side; all zero if nothing was written yet."""
    path = Path(path)
    totals = dict.fromkeys(COUNTER_NAMES, 0)
    meta: dict[str, Any] = {}
    files = [path, *_rank_files(path), scheduler_stats_path(path)]
    for index, file in enumerate(files):
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            continue  # that process has not written yet
        except (OSError, ValueError):
            logger.warning("kvtransfer: unreadable counters file %s; left out of the totals", file, exc_info=True)
            continue
        for name in COUNTER_NAMES:
            totals[name] += int(data.get(name, 0))
        if index == 0:
            meta = {k: data[k] for k in ("pid", "time_s") if k in data}
    return totals | meta


def _rank_files(path: Path) -> list[Path]:
    """The files of ranks 1.. next to `path`. Read every health ping (twice a
    second): a folder of the connector's own is listed, not a shared one."""
    prefix = f"{path.name}.rank"
    try:
        names = [entry.name for entry in os.scandir(path.parent) if entry.name.startswith(prefix)]
    except FileNotFoundError:
        return []
    return [path.with_name(name) for name in sorted(names) if name[len(prefix):].isdigit()]


def remove_stats(path: str | os.PathLike) -> None:
    """Remove the counters files of `path` (every rank and the scheduler side),
    and the folder `default_stats_path` made for them once it is empty. Called
    by the process that chose the path, when it stops."""
    path = Path(path)
    for file in (path, *_rank_files(path), scheduler_stats_path(path)):
        file.unlink(missing_ok=True)
    if path.parent.name.startswith(STATS_DIR_PREFIX):
        try:
            path.parent.rmdir()
        except OSError:  # not empty (a rank still writing, a stray temp file), or gone already
            logger.debug("kvtransfer: counters folder %s left in place", path.parent, exc_info=True)
