"""A decode group is replaced by two new ones under load: start before retire, nothing dropped.

A real router serves one prefill and one decode group (p0, d0) of the tiny model.
While clients keep sending greedy completions, `POST /plan` asks for
p0 with decode groups d1 and d2 instead of d0: the router starts decode-d1 and
decode-d2, routes to them once they answer, drains decode-d0 and stops it for
good. Every request completes with the same tokens as before the change, the
new workers serve, decode-d0's processes are gone and were not restarted, and
/metrics counts 2 workers started and 1 retired.
"""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.local_plans import local_plan, write_local_plan
from engine.tiny_model import TINY_MODEL_NAME
from router_process import start_router

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
NUM_CLIENTS = 2
PROMPTS = [f"Prompt {i}: the {i * 7} quick brown foxes jump over lazy dogs" for i in range(5)]
# Each client's pause between requests: the load never stops, but leaves the 2-core CI machine
# room to load the new engines (starting the two took 147 s with no pause, 56 s with this one;
# the router's first two load in 34 s with no load at all).
PAUSE_S = 0.5
CHANGE_TIMEOUT_S = 240.0


def _replacement_plan() -> dict:
    plan = local_plan(1, 3)
    plan.groups = [g for g in plan.groups if g.id != "d0"]
    plan.routes = [r for r in plan.routes if r.decode != "d0"]
    return plan.to_json()


def _counters(router) -> dict:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{router.base_url}/metrics").text):
        for sample in family.samples:
            if sample.name == "hexserve_route_requests_total":
                values[(sample.labels["prefill"], sample.labels["decode"])] = sample.value
            elif sample.name in ("hexserve_workers_started_total", "hexserve_workers_retired_total"):
                values[sample.name] = sample.value
            elif sample.name == "hexserve_plan_changes_total":
                values[("plan_changes", sample.labels["outcome"])] = sample.value
    return values


class _Load:
    """NUM_CLIENTS clients sending PROMPTS in turn, PAUSE_S apart, until stopped."""

    def __init__(self, router):
        self.router, self.stopped, self.errors = router, threading.Event(), []
        self.answers: list[tuple[int, list[int]]] = []
        self.threads = [threading.Thread(target=self._client, args=(c,)) for c in range(NUM_CLIENTS)]

    def _client(self, offset: int) -> None:
        body = {"model": TINY_MODEL_NAME, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        try:
            with httpx.Client(base_url=self.router.base_url, timeout=120) as http:
                i = offset
                while not self.stopped.is_set():
                    answer = http.post("/v1/completions", json={**body, "prompt": PROMPTS[i % len(PROMPTS)]})
                    if answer.status_code != 200:
                        self.errors.append(answer.text)
                    else:
                        self.answers.append((i % len(PROMPTS), answer.json()["choices"][0]["token_ids"]))
                    i += 1
                    self.stopped.wait(PAUSE_S)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))

    def until(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < count and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=120)


def _wait_for_the_change(router, change_id: int) -> dict:
    deadline = time.monotonic() + CHANGE_TIMEOUT_S
    while time.monotonic() < deadline:
        entry = next(h for h in httpx.get(f"{router.base_url}/plan").json()["history"] if h.get("id") == change_id)
        if entry["state"] in ("done", "failed"):
            return entry
        time.sleep(0.5)
    pytest.fail(f"plan change {change_id} not done after {CHANGE_TIMEOUT_S:.0f} s; see {router.log_dir}")


def test_a_decode_group_is_replaced_by_two_new_ones_under_load(tmp_path, tiny_model_dir):
    router = start_router(tmp_path, "--plan", str(write_local_plan(tmp_path, 1, 1)), "--model", tiny_model_dir,
                          "--served-model-name", TINY_MODEL_NAME, "--routing", "round-robin")
    try:
        old = router.worker_processes("decode-d0")
        assert old, "no decode-d0 process"
        with _Load(router) as load:
            load.until(2)
            answer = httpx.post(f"{router.base_url}/plan", json=_replacement_plan())
            assert answer.status_code == 202, answer.text
            assert (answer.json()["starts"], answer.json()["retires"]) == (["decode-d1", "decode-d2"], ["decode-d0"])
            during = len(load.answers)
            entry = _wait_for_the_change(router, answer.json()["id"])
            done_at, after = time.monotonic(), len(load.answers)
            load.until(after + 6)
        assert not load.errors, load.errors[:3]
        assert entry["state"] == "done", entry
        assert after > during and len(load.answers) >= after + 6  # served throughout, and after the change
        steps = [step["step"] for step in entry["steps"]]
        assert steps[:2] == ["accepted", "start"] and steps[-4:] == ["drain", "retire", "retired", "done"], steps

        # Greedy: every answer to a prompt, before, during and after the change, is the same.
        tokens: dict[int, set[tuple[int, ...]]] = {}
        for prompt, ids in load.answers:
            tokens.setdefault(prompt, set()).add(tuple(ids))
        assert all(len(variants) == 1 for variants in tokens.values()), tokens

        counters = _counters(router)
        assert counters[("prefill-p0", "decode-d1")] >= 1 and counters[("prefill-p0", "decode-d2")] >= 1, counters
        assert counters["hexserve_workers_started_total"] == 2 and counters["hexserve_workers_retired_total"] == 1
        assert counters[("plan_changes", "done")] == 1, counters
        view = httpx.get(f"{router.base_url}/plan").json()
        assert set(view["workers"]) == {"prefill-p0", "decode-d1", "decode-d2"} and view["change"] is None

        # decode-d0 is gone, and stays gone past the supervisor's restart checks (every 2 s).
        time.sleep(max(0.0, 2.5 - (time.monotonic() - done_at)))
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in old)
        assert router.worker_processes("decode-d0") == []
        log = (tmp_path / "router.log").read_text()
        assert "decode-d0 had exited" not in log and "plan change 1: retired: decode-d0" in log
    finally:
        router.stop()
