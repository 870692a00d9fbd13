"""Start `python -m router serve` as a real process for tests, and find its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from common.ports import free_tcp_port
from common.roles import Role
from engine.worker_spec import WORKER_MODULES

EMBEDDED_API_KEY = "test-key-123"  # the session-wide embedded router requires it


@dataclass
class RouterProcess:
    proc: subprocess.Popen
    port: int
    api_key: str | None
    log_dir: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def worker_pid(self, role: str) -> int:
        """PID of the router's worker of this role (`python -m prefill|decode|engine`)."""
        module = WORKER_MODULES[Role.parse(role)]
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if "-m" in cmdline and module in cmdline and "--control-endpoint" in cmdline:
                return child.pid
        raise LookupError(f"no {role} worker under router pid {self.proc.pid}")

    def worker_processes(self, worker_id: str) -> list[psutil.Process]:
        """The router's descendants running worker `worker_id` (the worker and any engine process it forked)."""
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if "--worker-id" in cmdline and cmdline[cmdline.index("--worker-id") + 1] == worker_id:
                found.append(child)
        return found

    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}; see {self.log_dir}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"router not healthy after {timeout_s} s; see {self.log_dir}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_router(log_dir: Path, *args: str, api_key: str | None = None) -> RouterProcess:
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "router", "serve", "--port", str(port), "--log-dir", str(log_dir), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    return _started(cmd, port, log_dir, "router.log", dict(os.environ), api_key)


def start_vllm_server(log_dir: Path, model_dir: str, *flags: str) -> RouterProcess:
    """`vllm serve` of the model with the engine settings the router's workers use (engine.config)."""
    from engine.config import tiny_model_settings

    settings = tiny_model_settings(model=model_dir)
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port), "--disable-log-stats"]
    for name, value in settings.engine_kwargs().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            cmd += [flag, str(value)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(settings.cpu_kvcache_gib))
    return _started(cmd + list(flags), port, log_dir, "vllm-serve.log", env, None)


def _started(cmd: list[str], port: int, log_dir: Path, log_name: str, env: dict, api_key: str | None) -> RouterProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / log_name, "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env, PYTHONUNBUFFERED="1"))
    router = RouterProcess(proc=proc, port=port, api_key=api_key, log_dir=log_dir)
    try:
        router.wait_healthy()
    except Exception:
        router.stop()
        raise
    return router
