"""A quiet start (issue 18): progress lines and the ready line on the terminal,
engine logs in files (or on the terminal with --verbose), and no socket files left."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.roles import Role
from engine.worker_spec import WorkerSpec
from router.launch_local import (LocalLauncher, local_worker_endpoint, remove_stale_socket_folders,
                                 run_socket_folder, socket_root)
from router import serve as serve_module
from router.serve import ServeOptions, StartupError, make_launcher
from router.worker_client import WorkerUnavailable


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_worker_logs_go_to_a_new_folder_per_run_unless_verbose():
    launcher = make_launcher(ServeOptions(), deployment=None)
    assert launcher.log_dir.parent == Path(tempfile.gettempdir()) / f"hexserve-logs-{__import__('os').getuid()}"
    assert "(--verbose shows them here)" in launcher.logs_note()
    assert launcher.log_location("decode-0") == str(launcher.log_dir / "decode-0.log")
    assert make_launcher(ServeOptions(log_dir=Path("/x/logs")), deployment=None).log_dir == Path("/x/logs")
    verbose = make_launcher(ServeOptions(verbose=True), deployment=None)
    assert verbose.log_dir is None and verbose.log_location("decode-0") == "the output above"


class _FakeClient:
    def __init__(self, worker_id: str, after_s: float, fails: bool = False):
        self.worker_id, self.after_s, self.fails = worker_id, after_s, fails

    async def wait_healthy(self, timeout_s: float) -> None:
        await asyncio.sleep(self.after_s)
        if self.fails:
            raise WorkerUnavailable(f"worker {self.worker_id} exited before it became healthy")


def _wait(clients, monkeypatch):
    monkeypatch.setattr(serve_module, "LOADING_NOTE_EVERY_S", 0.15)
    cluster = SimpleNamespace(clients={c.worker_id: c for c in clients})
    launcher = SimpleNamespace(log_location=lambda worker_id: f"/logs/{worker_id}.log")
    asyncio.run(serve_module._wait_ready(cluster, launcher, 60.0, time.monotonic()))


def test_one_progress_line_per_worker_and_a_note_while_loading(monkeypatch, capsys):
    _wait([_FakeClient("prefill-0", 0.05), _FakeClient("decode-0", 0.4)], monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  prefill-0: healthy after 0.") and lines[0].endswith(" s")
    assert "  still loading: decode-0 (0 s)" in lines
    assert lines[-1].startswith("  decode-0: healthy after 0.")


def test_a_worker_that_exits_while_loading_stops_the_start_with_its_log(monkeypatch, capsys):
    with pytest.raises(StartupError) as failed:
        _wait([_FakeClient("prefill-0", 5.0), _FakeClient("decode-0", 0.05, fails=True)], monkeypatch)
    assert str(failed.value) == ("the cluster did not start: worker decode-0 exited before it became healthy; "
                                 "see /logs/decode-0.log")
    out = capsys.readouterr().out
    assert "  decode-0: failed after 0." in out and "read /logs/decode-0.log" in out
    assert "prefill-0: healthy" not in out  # the other worker's wait was cancelled, not waited out


def _echo_spec(monkeypatch, worker_id: str) -> WorkerSpec:
    """A worker whose process only prints one engine-like log line and exits."""
    spec = WorkerSpec(worker_id=worker_id, role=Role.DECODE, control_endpoint=local_worker_endpoint(worker_id, "control"))
    monkeypatch.setattr(WorkerSpec, "command",
                        lambda self: [sys.executable, "-c", "print('INFO EngineCore says hello', flush=True)"])
    return spec


def test_worker_output_goes_to_its_log_file_and_with_verbose_to_the_terminal(monkeypatch, tmp_path, capfd):
    quiet = LocalLauncher(log_dir=tmp_path)
    quiet.start(_echo_spec(monkeypatch, "w-quiet"))
    quiet.processes["w-quiet"].wait(timeout=60)
    quiet.stop()
    assert "EngineCore says hello" in (tmp_path / "w-quiet.log").read_text()
    assert "EngineCore" not in capfd.readouterr().out

    verbose = LocalLauncher(log_dir=None)
    verbose.start(_echo_spec(monkeypatch, "w-verbose"))
    verbose.processes["w-verbose"].wait(timeout=60)
    verbose.stop()
    assert "INFO EngineCore says hello" in capfd.readouterr().out


def test_stop_removes_the_socket_files_and_the_run_folder():
    launcher = LocalLauncher(log_dir=None)
    spec = WorkerSpec(worker_id="w0", role=Role.DECODE, control_endpoint=local_worker_endpoint("w0", "control"),
                      kv_endpoint=local_worker_endpoint("w0", "kv"))
    folder = run_socket_folder()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("w0-control.sock", "w0-kv.sock"):  # what a killed worker leaves (ZeroMQ does not unlink)
        (folder / name).touch()
    launcher.specs["w0"] = spec
    launcher.stop()
    assert not folder.exists()


def test_a_later_run_removes_what_dead_routers_left(tmp_path):
    dead, alive = _dead_pid(), __import__("os").getpid()
    (tmp_path / str(dead)).mkdir()
    (tmp_path / str(dead) / "decode-0-kv.sock").touch()
    (tmp_path / str(dead) / "decode-0-kv.sock.rank1").touch()
    counters = tmp_path / str(dead) / "decode-0-kvstats" / "hexserve-kvstats-consumer-1-abc"  # a killed worker's
    counters.mkdir(parents=True)
    (counters / "counters.json").write_text("{}")
    (tmp_path / f"{dead}-prefill-0-control.sock").touch()  # the flat names of older runs
    (tmp_path / str(alive)).mkdir()
    (tmp_path / str(alive) / "decode-0-kv.sock").touch()
    (tmp_path / "notes").touch()
    removed = remove_stale_socket_folders(tmp_path)
    assert sorted(p.name for p in removed) == sorted([str(dead), f"{dead}-prefill-0-control.sock"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(alive), "notes"])


@pytest.mark.slow
def test_router_start_shows_progress_and_ready_and_no_engine_logs(embedded_router):
    """The session's embedded router (no extra start): its terminal output is
    the progress lines and the ready line; the engines' logs are in the files."""
    out_path = embedded_router.log_dir / "router.log"
    deadline = time.monotonic() + 30
    while "hexserve router ready" not in out_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)  # the line follows uvicorn's start, which /health already answered
    text = out_path.read_text()
    lines = text.splitlines()
    assert lines[:2] == ["hexserve: preparing vLLM's OpenAI layer",  # the default --api vllm
                         f"hexserve: starting 2 worker(s) of 'hexserve-tiny-llama'; worker logs in "
                         f"{embedded_router.log_dir}/ (--verbose shows them here)"], text[:2000]
    for worker in ("prefill-0", "decode-0"):
        role = worker.split("-")[0]
        assert f"  {worker} ({role}): starting, loading the model" in lines, text[:2000]
        assert any(line.startswith(f"  {worker}: healthy after ") and line.endswith(" s") for line in lines), text
        worker_log = (embedded_router.log_dir / f"{worker}.log").read_text()
        assert "EngineCore" in worker_log or "INFO" in worker_log
    ready = [line for line in lines if line.startswith("hexserve router ready: ")]
    assert ready == [f"hexserve router ready: http://127.0.0.1:{embedded_router.port}/v1 (model "
                     "'hexserve-tiny-llama', 2 workers, 1 route(s))"], text[-2000:]
    for noise in ("EngineCore", " INFO ", "INFO ", "Triton", "vllm", "Traceback"):
        assert noise not in text, f"{noise!r} in the router's output:\n{text[:3000]}"
    # Its sockets live in its own folder while it runs (the session-end check in
    # tests/conftest.py fails the run if the folder outlives it).
    assert (socket_root() / str(embedded_router.proc.pid) / "decode-0-control.sock").exists()


def test_a_port_in_use_is_refused_in_one_line_before_any_worker_starts(tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "router", "serve", "--port", str(port), "--log-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port or --host")
    assert "Traceback" not in done.stderr and "starting" not in done.stdout  # no worker was launched
    assert not list(tmp_path.glob("*.log"))
    assert time.monotonic() - started < 60


def test_the_reserved_port_is_held_until_the_router_closes_it():
    import socket

    held = serve_module.reserve_listener("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # a worker's socket cannot take it while the models load
    finally:
        held.close()
