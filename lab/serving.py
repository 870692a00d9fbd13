"""Serving a plan on a lab: `python -m router serve --plan --ray` in the head host.

The router, like the load generator, runs in the head's namespace (outside
every device cgroup), so only commands started there reach it; this module
starts it, waits for its ready line, and stops it with its workers.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.network import exec_in, namespace_pids

READY_LINE = "hexserve router ready"


@contextlib.contextmanager
def serve_plan(state: dict, plan: Path, port: int, log: Path, extra_args: tuple[str, ...] = (),
               timeout_s: float = 900.0):
    """Yields the router's base URL (valid inside the head's namespace) once every worker is healthy."""
    head = state["hosts"][0]["namespace"]
    command = [sys.executable, "-m", "router", "serve", "--plan", str(plan), "--ray", state["ray_address"],
               "--port", str(port), *extra_args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(exec_in(head, command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"the router exited with {proc.returncode} before it was ready; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router was not ready after {timeout_s:.0f} s; see {log}")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)  # the router stops its Ray actors, and they their workers
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def router_pids(state: dict) -> list[int]:
    """The processes of the router(s) serving in the head host (for CPU accounting)."""
    pids = []
    for pid in namespace_pids(state["hosts"][0]["namespace"]):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if b"router" in command and b"serve" in command:
            pids.append(pid)
    return pids


def run_in_head(state: dict, command: list[str], log: Path | None = None, timeout_s: float | None = None) -> None:
    """Run a command (a load test, a profile) in the head's namespace; raise if it fails."""
    head = state["hosts"][0]["namespace"]
    with open(log, "ab") if log else contextlib.nullcontext() as out:
        proc = subprocess.run(exec_in(head, command), stdout=out, stderr=subprocess.STDOUT if out else None,
                              timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[:4])} ...` failed in the lab (exit {proc.returncode})"
                           + (f"; see {log}" if log else ""))
