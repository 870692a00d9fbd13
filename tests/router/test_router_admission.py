"""Bounded admission: requests beyond the running slots and the waiting line get 429."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from engine import control_protocol as proto
from engine.tiny_model import TINY_MODEL_NAME
from router.admission import Admission, AdmissionRejected
from router.app import create_app
from router.prepare import RouterSettings
from common.routing import Route


def test_admission_refuses_past_running_and_waiting_bounds():
    async def scenario():
        admission = Admission(max_running=1, max_waiting=1)
        release = asyncio.Event()
        order = []

        async def hold(name):
            async with admission.slot():
                order.append(name)
                await release.wait()

        first = asyncio.ensure_future(hold("first"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(hold("second"))  # waits in line
        await asyncio.sleep(0)
        assert (admission.running, admission.waiting) == (1, 1) and admission.is_full()
        with pytest.raises(AdmissionRejected, match="capacity"):
            async with admission.slot():
                pass
        release.set()
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and not admission.is_full()

    asyncio.run(scenario())


class _BlockedCluster:
    """Stand-in cluster whose requests wait for `release`, so admission fills up."""

    def __init__(self):
        self.release = asyncio.Event()
        self.clients = {}
        self.routes = [Route("p", "d", 1.0)]

    def any_route_healthy(self):
        return True

    async def generate(self, prompt_token_ids, sampling, on_retry=None):
        await self.release.wait()
        yield Route("p", "d", 1.0), proto.Output(version=1, request_id="r", token_ids=[5], text="x",
                                                 finished=True, finish_reason="length")


def test_full_router_answers_429(tiny_model_dir):
    from transformers import AutoTokenizer

    async def scenario():
        cluster = _BlockedCluster()
        app = create_app(cluster, RouterSettings(TINY_MODEL_NAME, 1024), AutoTokenizer.from_pretrained(tiny_model_dir),
                         admission=Admission(max_running=1, max_waiting=1))
        body = {"model": TINY_MODEL_NAME, "prompt": "hi", "max_tokens": 1}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            held = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(2)]
            for _ in range(100):  # until one runs and one waits
                if app.state.router.admission.is_full():
                    break
                await asyncio.sleep(0.01)
            try:  # a router that queued this one instead would block here: fail, do not hang
                refused = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=10)
            finally:
                cluster.release.set()
            answered = await asyncio.gather(*held)
        return refused, answered

    refused, answered = asyncio.run(scenario())
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in answered] == [200, 200]
