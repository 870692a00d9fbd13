"""A worker dies: clients get an answer within seconds, the surviving worker serves alone
(degraded) while the other restarts, and the router recovers."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.tiny_model import TINY_MODEL_NAME
from router_process import start_router

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_router(tmp_path_factory, tiny_model_dir):
    router = start_router(tmp_path_factory.mktemp("fault-router"))
    yield router
    router.stop()


def _completion(router, timeout=30.0, **extra):
    body = {"model": TINY_MODEL_NAME, "prompt": "fault test", "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=timeout)


def test_decode_killed_mid_stream_the_stream_migrates_then_the_router_recovers(fault_router):
    assert _completion(fault_router).status_code == 200
    body = {"model": TINY_MODEL_NAME, "prompt": "a long answer", "max_tokens": 300, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{fault_router.base_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        events.append(next(line for line in lines if line.startswith("data:")))
        decode_pid = fault_router.worker_pid("decode")
        killed_at = time.monotonic()
        os.killpg(decode_pid, signal.SIGKILL)  # the worker and its engine processes
        events.extend(line for line in lines if line.startswith("data:"))
        ended_after_s = time.monotonic() - killed_at
    # The stream goes on: its tokens so far became the prompt of the only worker left
    # (the prefill worker, serving alone), and it ends normally with every token.
    assert ended_after_s < 60, ended_after_s
    assert events[-1] == "data: [DONE]"
    assert not any('"error"' in e for e in events), [e for e in events if '"error"' in e]
    assert '"completion_tokens":300' in events[-2], events[-2]
    assert _gauge(fault_router, "hexserve_migrated_requests") == 1

    # While the only decode worker is down, the prefill worker serves requests alone.
    degraded_before = _gauge(fault_router, "hexserve_degraded_requests")
    response = _completion(fault_router)
    assert response.status_code == 200, response.text
    assert _gauge(fault_router, "hexserve_degraded_requests") == degraded_before + 1
    health = httpx.get(f"{fault_router.base_url}/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded", health.text

    # The router restarts the worker; once it is healthy again, requests succeed.
    _wait_healthy(fault_router)
    assert fault_router.worker_pid("decode") != decode_pid
    response = _completion(fault_router)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def _gauge(router, name: str) -> float:
    return float(re.search(rf"^{name} ([\d.e+-]+)$", httpx.get(f"{router.base_url}/metrics").text, re.M).group(1))


def _wait_healthy(router, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{router.base_url}/health").json()["status"] == "ok":
            return
        time.sleep(1)
    raise AssertionError("the router did not recover its prefill->decode route")


def test_prefill_killed_under_load_every_request_completes_degraded(fault_router):
    """60 requests over 9 s; the only prefill worker dies 2 s in. The decode worker, a
    full engine, serves alone until the prefill worker is back: no request fails."""
    _wait_healthy(fault_router)

    def one(i: int):
        time.sleep(i * 0.15)
        return _completion(fault_router, timeout=120, prompt=f"request {i} under load", max_tokens=8,
                           ignore_eos=True)

    with ThreadPoolExecutor(max_workers=60) as pool:
        answers = [pool.submit(one, i) for i in range(60)]
        time.sleep(2.0)
        prefill_pid = fault_router.worker_pid("prefill")
        os.killpg(prefill_pid, signal.SIGKILL)
        responses = [a.result() for a in answers]
    failed = [r.text for r in responses if r.status_code != 200]
    assert not failed, failed[:3]
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
    assert _gauge(fault_router, "hexserve_degraded_requests") >= 1
    # Disaggregation resumes once the restarted prefill worker is healthy.
    _wait_healthy(fault_router)
    assert fault_router.worker_pid("prefill") != prefill_pid
    degraded = _gauge(fault_router, "hexserve_degraded_requests")
    assert _completion(fault_router).status_code == 200
    assert _gauge(fault_router, "hexserve_degraded_requests") == degraded


def test_sigterm_drains_in_flight_streams_then_exits(fault_router):
    """Runs last in this module: it stops the module's router."""
    assert httpx.get(f"{fault_router.base_url}/health").status_code == 200
    body = {"model": TINY_MODEL_NAME, "prompt": "drain me", "max_tokens": 200, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{fault_router.base_url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        fault_router.proc.send_signal(signal.SIGTERM)
        events = [line for line in lines if line.startswith("data:")]
    # The request admitted before SIGTERM ran to its end, usage and [DONE] included.
    assert events[-1] == "data: [DONE]"
    assert '"completion_tokens":200' in events[-2], events[-2]
    assert not any('"error"' in e for e in events)
    assert fault_router.proc.wait(timeout=90) == 0


def test_worker_dying_while_loading_stops_the_router_with_the_reason(tmp_path, tiny_model_dir):
    """A model the engines cannot load (its weights are gone; the tokenizer is fine):
    each worker exits while loading, and the router says so and exits at once
    instead of waiting out its 15-minute start timeout."""
    import shutil
    import subprocess
    import sys

    from common.ports import free_tcp_port

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    log = tmp_path / "router.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        code = subprocess.call(
            [sys.executable, "-m", "router", "serve", "--port", str(free_tcp_port()), "--model", str(broken),
             "--log-dir", str(tmp_path / "workers")],
            stdout=out, stderr=subprocess.STDOUT, timeout=300,
        )
    text = log.read_text()
    assert code != 0, text[-2000:]
    assert "the cluster did not start" in text and "exited before it became healthy" in text, text[-2000:]
    # It names the log to read, and says so on one line rather than a traceback (issue 18).
    assert any(f"see {tmp_path / 'workers' / worker}.log" in text for worker in ("prefill-0", "decode-0")), text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert time.monotonic() - started < 240
