"""Starting workers as local processes (the embedded default, and plans on one machine).

Each worker runs `python -m prefill|decode ...` in its own process group, so
stopping it also stops the vLLM engine processes it spawned, and with
`--exit-with-parent`, so a router that dies takes its workers with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common.ports import release_tcp_ports, reserve_tcp_ports
from common.sockets import ipc_path, tcp_address
from engine.worker_spec import WorkerSpec
from kvtransfer import STATS_DIR_ENV, endpoint_parts, remove_receiver_files


def local_endpoint(host: str = "127.0.0.1", ports: int = 1) -> str:
    """A TCP endpoint for a worker to bind (with `ports` consecutive ports, one per
    rank), its ports held by this process until remove_endpoint_files: the
    worker binds only once its model has loaded (common.ports says why)."""
    return f"tcp://{host}:{reserve_tcp_ports(host, ports)}"


WORKER_LINKS = ("ipc", "tcp")


def local_worker_endpoint(worker_id: str, purpose: str, link: str = "ipc", host: str = "127.0.0.1", ranks: int = 1) -> str:
    """Where a worker on this machine listens: purpose "control" (the router's
    endpoint), "kv" (a decode worker's KV; a TP/PP worker's ranks add
    `.rank<r>`, see kvtransfer.rank_endpoint) or "events" (its engine's
    KV-cache events, for the router's prefix index).

    ipc (Unix sockets) by default: between processes on one host they move KV
    with less CPU than loopback TCP (benchmarks/kvtransfer_throughput), and a
    socket path cannot be taken by someone else between choosing it and
    binding it, as a free TCP port can (a worker binds only once its model has
    loaded). The files live in this router's own folder (`run_socket_folder`).
    ZeroMQ leaves a socket file behind when it closes (and a killed worker
    cannot clean up), so LocalLauncher.stop removes them and the folder
    (remove_endpoint_files), and a launcher removes the folders of routers
    that died without stopping (remove_stale_socket_folders); a bind replaces
    a stale file.
    """
    if link == "tcp":
        return local_endpoint(host, ports=ranks)
    if link != "ipc":
        raise ValueError(f"worker link {link!r}; use one of {WORKER_LINKS}")
    return f"ipc://{run_socket_folder()}/{worker_id}-{purpose}.sock"


def socket_root() -> Path:
    """The folder (one per user) that holds every local router's socket folder."""
    return Path(tempfile.gettempdir()) / f"hexserve-{os.getuid()}"


def run_socket_folder(pid: int | None = None) -> Path:
    """This router's socket folder, named by its pid: what one run leaves is in one place."""
    return socket_root() / str(os.getpid() if pid is None else pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_socket_folders(root: Path | None = None) -> list[Path]:
    """Remove the socket folders (and their receivers' arrival marks) of routers
    that are no longer running, e.g. killed before they could stop their
    workers; returns what was removed."""
    root = socket_root() if root is None else root
    removed = []
    for entry in sorted(root.glob("*")) if root.is_dir() else []:
        owner = entry.name.split("-", 1)[0]  # "<pid>" folders; "<pid>-<worker>-<purpose>.sock" from older runs
        if not owner.isdigit() or _pid_alive(int(owner)):
            continue
        for sock in [*entry.iterdir()] if entry.is_dir() else [entry]:
            if not sock.is_dir():  # a worker's counters folder (kv_stats_folder) goes with rmtree below
                remove_receiver_files(f"ipc://{sock}")  # the file and its arrival-mark folder, if it was a receiver
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def kv_stats_folder(worker_id: str) -> Path:
    """Where a local worker's connector puts its counters folder (STATS_DIR_ENV):
    the worker removes its own when it stops; a killed one's goes with this."""
    return run_socket_folder() / f"{worker_id}-kvstats"


def release_endpoint_ports(spec: WorkerSpec) -> None:
    """Stop holding the TCP ports local_endpoint reserved in this process for the worker."""
    kv_endpoints = endpoint_parts(spec.kv_endpoint) if spec.kv_endpoint else []  # each rank's, on several hosts
    for endpoint in (spec.control_endpoint, spec.kv_events_endpoint, *kv_endpoints):
        if endpoint and (address := tcp_address(endpoint)) is not None:
            release_tcp_ports(*address)


def remove_endpoint_files(spec: WorkerSpec) -> None:
    """What a stopped worker leaves on this machine (a killed process cannot
    remove them): its control socket file, and its KV receivers' socket files
    and arrival-mark folders, which kvtransfer knows how to find; its transfer
    counters (kv_stats_folder); and the TCP ports local_endpoint held for it."""
    release_endpoint_ports(spec)
    shutil.rmtree(kv_stats_folder(spec.worker_id), ignore_errors=True)
    for endpoint in (spec.control_endpoint, spec.kv_events_endpoint):
        if endpoint and (path := ipc_path(endpoint)) is not None:
            path.unlink(missing_ok=True)
    if spec.kv_endpoint:
        remove_receiver_files(spec.kv_endpoint, spec.num_ranks)


def default_log_dir() -> Path:
    """Where worker logs go when no --log-dir is given: a new folder per run."""
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"hexserve-logs-{os.getuid()}" / run


@dataclass
class LocalLauncher:
    """Owns worker processes on this machine; `stop()` drains then kills.

    Each worker's output (its engine's included) goes to `log_dir/<worker>.log`;
    with no log_dir it goes to the router's terminal (`--verbose`). Workers
    come and go while the router runs (`add_workers`, `retire_workers`, a
    live plan change) beside the supervisor's `restart_dead`, each from its
    own thread: one lock keeps a retired worker from being started again.
    """

    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    specs: dict[str, WorkerSpec] = field(default_factory=dict)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        remove_stale_socket_folders()

    def logs_note(self) -> str:
        if self.log_dir is None:
            return "worker logs below"
        return f"worker logs in {self.log_dir}/ (--verbose shows them here)"

    def log_location(self, worker_id: str) -> str:
        """Where to read this worker's output, for progress and error messages."""
        return str(self.log_dir / f"{worker_id}.log") if self.log_dir is not None else "the output above"

    def start(self, spec: WorkerSpec) -> WorkerSpec:
        """Start the worker; returns its spec (as started: a Ray launcher may move endpoints)."""
        with self._lock:
            self._spawn(spec)
            self.specs[spec.worker_id] = spec
        return spec

    def add_workers(self, specs: list[WorkerSpec], placement: dict[str, dict] | None = None) -> list[WorkerSpec]:
        """Start more workers while the others run (a live plan change); their specs as started.
        All or none: if one cannot start, those already started are stopped. `placement`
        is the Ray launcher's; a local worker runs here."""
        started: list[WorkerSpec] = []
        try:
            for spec in specs:
                if spec.worker_id in self.specs:
                    raise ValueError(f"worker {spec.worker_id!r} is already running")
                started.append(self.start(spec))
        except BaseException:
            self.retire_workers([s.worker_id for s in started])
            raise
        return started

    def retire_workers(self, worker_ids: list[str], drain_timeout_s: float = 30.0) -> None:
        """Stop these workers for good (a live plan change retired them): never restarted,
        their socket files removed. Their requests should be done: the router drains first."""
        with self._lock:  # out of restart_dead's reach before they die
            specs = [self.specs.pop(w) for w in worker_ids if w in self.specs]
            procs = [self.processes.pop(w) for w in worker_ids if w in self.processes]
            logs = [self._logs.pop(w) for w in worker_ids if w in self._logs]
        _terminate(procs, drain_timeout_s)
        for spec in specs:
            remove_endpoint_files(spec)
        for handle in logs:
            handle.close()

    def _spawn(self, spec: WorkerSpec) -> subprocess.Popen:
        if spec.worker_id in self.processes and self.processes[spec.worker_id].poll() is None:
            raise ValueError(f"worker {spec.worker_id!r} is already running")
        stdout = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if spec.worker_id in self._logs:  # a restart: the dead process's handle
                self._logs.pop(spec.worker_id).close()
            # Closed by stop(), retire_workers() or the next restart.
            stdout = self._logs[spec.worker_id] = open(self.log_dir / f"{spec.worker_id}.log", "ab")  # noqa: SIM115
        env = dict(os.environ, **spec.process_env())
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[STATS_DIR_ENV] = str(kv_stats_folder(spec.worker_id))
        proc = subprocess.Popen(spec.launch_command(), env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                                start_new_session=True)
        self.processes[spec.worker_id] = proc
        return proc

    def is_alive(self, worker_id: str) -> bool:
        proc = self.processes.get(worker_id)
        return proc is not None and proc.poll() is None

    def alive_checks(self) -> dict:
        return {worker_id: (lambda w=worker_id: self.is_alive(w)) for worker_id in self.processes}

    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> None:
        """Kill one worker and its engine processes (used by fault tests and shutdown)."""
        proc = self.processes[worker_id]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)

    def restart(self, spec: WorkerSpec) -> subprocess.Popen:
        old = self.processes.pop(spec.worker_id, None)
        if old is not None and old.poll() is None:
            raise ValueError(f"worker {spec.worker_id!r} is still running")
        if old is not None:  # reap what the dead worker left in its process group, and its counters
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old.pid, signal.SIGKILL)
            shutil.rmtree(kv_stats_folder(spec.worker_id), ignore_errors=True)
        return self._spawn(spec)

    def restart_dead(self) -> list[str]:
        """Start again every worker whose process exited; the router's health checks bring it back."""
        restarted = []
        with self._lock:
            for worker_id, spec in self.specs.items():
                if not self.is_alive(worker_id):
                    self.restart(spec)
                    restarted.append(worker_id)
        return restarted

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        with self._lock:
            _terminate(list(self.processes.values()), drain_timeout_s)
            for spec in self.specs.values():
                remove_endpoint_files(spec)
            with contextlib.suppress(OSError):  # kept while another launcher of this process still has sockets in it
                run_socket_folder().rmdir()
            for handle in self._logs.values():
                handle.close()
            self._logs.clear()
            self.processes.clear()
            self.specs.clear()


def _terminate(procs: list[subprocess.Popen], drain_timeout_s: float) -> None:
    """SIGTERM each worker's process group (the worker drains), then SIGKILL what is left of it."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        # Kill the whole group: the worker, and any engine process it left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
