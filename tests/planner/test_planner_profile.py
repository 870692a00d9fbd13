"""``python -m planner profile``: measurement against a simulated server, the fit, and a real vLLM on CPU."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from common.ports import free_tcp_port
from loadtest.client import normalize_base_url
from planner.__main__ import main
from planner.adapters.profiler import Prober, ProfileSettings, run_profile
from planner.spec.calibration import decode_bytes, fit_profile, prefill_flops
from planner.spec.catalog import default_catalog
from planner.spec.errors import PlanInputError
from planner.spec.model import model_preset
from planner.spec.profile import load_profile, parse_profile
from planner_factories import REPO, make_cluster
from threaded_server import ThreadedServer

TINY = model_preset("hexserve-tiny-llama")
CPU = default_catalog().resolve("CPU", "t")
TRUE_MFU, PREFILL_OVERHEAD_S = 0.03, 0.005
TRUE_BW, DECODE_OVERHEAD_S = 0.4e9, 0.002  # effective bytes/s: the catalog's 20 GB/s * mbu 0.02


def simulated_app(kv_tokens: int | None = None) -> FastAPI:
    """Answers like vLLM, with latencies the cost model's own formulas predict for known coefficients;
    with ``kv_tokens``, a request waits until its prompt and output fit the cache beside the running ones."""
    app = FastAPI()
    active = {"n": 0, "kv": 0}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "sim"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        n = len(body["prompt"])
        await asyncio.sleep(PREFILL_OVERHEAD_S + prefill_flops(TINY, n) / (CPU.peak_bf16_tflops * 1e12 * TRUE_MFU))
        if not body.get("stream"):
            return JSONResponse({"choices": [{"text": "x", "index": 0}]})

        async def stream():
            need = n + body["max_tokens"]
            while kv_tokens is not None and active["kv"] + need > kv_tokens:
                await asyncio.sleep(0.002)
            active["n"] += 1
            active["kv"] += need
            try:
                for k in range(body["max_tokens"]):
                    if k:
                        step = DECODE_OVERHEAD_S + decode_bytes(TINY, active["n"], n + k) / TRUE_BW
                        await asyncio.sleep(step)
                    yield f"data: {json.dumps({'choices': [{'text': 'x', 'index': 0}]})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                active["n"] -= 1
                active["kv"] -= need

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def test_profile_recovers_known_coefficients(tmp_path):
    with ThreadedServer(simulated_app()) as server:
        settings = ProfileSettings(url=server.url, gpu_type="CPU", prompt_lengths=(16, 128, 256, 384),
                                   batch_sizes=(1, 4, 8), decode_tokens=10, repeats=3)
        profile = run_profile(settings, preset="hexserve-tiny-llama")
    assert [s.prompt_tokens for s in profile.prefill] == [16, 128, 256, 384]
    assert profile.prefill[-1].latency_ms > profile.prefill[0].latency_ms
    assert [s.batch for s in profile.decode] == [1, 4, 8]
    fit = fit_profile(profile, CPU)
    # Sleep-based timings on a busy 2-core machine overshoot by milliseconds: tolerances are loose,
    # but a wrong formula (FLOPs or bytes off by a factor) lands far outside them.
    assert fit.mfu == pytest.approx(TRUE_MFU, rel=0.35)
    assert fit.mbu == pytest.approx(TRUE_BW / (CPU.memory_bandwidth_gb_per_s * 1e9), rel=0.5)
    assert fit.prefill_r2 > 0.8
    # The profile survives a round trip through its file format.
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_json()))
    again = load_profile(path)
    assert [s.prompt_tokens for s in again.prefill] == [s.prompt_tokens for s in profile.prefill]
    assert [s.latency_ms for s in again.prefill] == pytest.approx([s.latency_ms for s in profile.prefill], abs=1e-3)
    assert again.model.num_layers == TINY.num_layers


def test_decode_at_two_prompt_lengths_leaves_out_a_batch_the_cache_cannot_hold(capsys):
    with ThreadedServer(simulated_app(kv_tokens=400)) as server:
        settings = ProfileSettings(url=server.url, gpu_type="CPU", prompt_lengths=(16, 64), batch_sizes=(1, 4, 6),
                                   decode_tokens=8, decode_prompt_lengths=(16, 120), repeats=1)
        profile = run_profile(settings, preset="hexserve-tiny-llama")
    # 4 x (120 + 8) tokens do not fit 400: that batch never runs all at once, and it and the larger one
    # are said to be left out.
    assert [(s.batch, s.context_tokens) for s in profile.decode] == [(1, 20.0), (4, 20.0), (6, 20.0), (1, 124.0)]
    assert ("decode at 120-token prompts: batch sizes 4, 6 left out (batch 4 never ran all at once"
            in capsys.readouterr().out)
    with ThreadedServer(simulated_app(kv_tokens=80)) as server:  # at the first length it stops the profile
        settings = dataclasses.replace(settings, url=server.url, decode_prompt_lengths=(16,))
        with pytest.raises(PlanInputError, match="batch 4: no overlapping decode window"):
            run_profile(settings, preset="hexserve-tiny-llama")
    with ThreadedServer(simulated_app(kv_tokens=110)) as server:  # two batch sizes measured: the rest left out
        profile = run_profile(dataclasses.replace(settings, url=server.url), preset="hexserve-tiny-llama")
    assert [s.batch for s in profile.decode] == [1, 4]
    assert "decode at 16-token prompts: batch sizes 6 left out" in capsys.readouterr().out


def test_calibration_file_changes_the_catalog_used_by_the_plan(tmp_path):
    profile = {
        "schema": "hexserve.profile", "schema_version": 1, "gpu_type": "H100", "tp": 1,
        "model": model_preset("Llama-3-8B").to_json(),
        "prefill": [{"prompt_tokens": n, "latency_ms": 2 + prefill_flops(model_preset("Llama-3-8B"), n) / 989e12 / 0.3 * 1e3}
                    for n in (128, 512, 1024, 2048)],
        "decode": [{"batch": b, "context_tokens": 600, "step_ms": 1 + decode_bytes(model_preset("Llama-3-8B"), b, 600) / 3350e9 / 0.6 * 1e3}
                   for b in (1, 8, 32)],
    }
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(profile))
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 1}], model="Llama-3-8B", calibration=[str(path)])
    spec = c.nodes[0].spec
    assert spec.mfu == pytest.approx(0.3, rel=1e-3) and spec.mbu == pytest.approx(0.6, rel=1e-3)
    assert spec.prefill_overhead_ms == pytest.approx(2, abs=1e-3) and spec.decode_overhead_ms == pytest.approx(1, abs=1e-3)


def test_bad_profiles_name_the_field(tmp_path):
    with pytest.raises(PlanInputError, match="profile.schema"):
        parse_profile({"schema": "x", "schema_version": 1})
    with pytest.raises(PlanInputError, match="at least 2"):
        parse_profile({"schema": "hexserve.profile", "schema_version": 1, "gpu_type": "CPU",
                       "model": TINY.to_json(), "prefill": [{"prompt_tokens": 1, "latency_ms": 1}], "decode": []})
    with pytest.raises(PlanInputError, match="at least two distinct"):
        ProfileSettings(url="http://x", gpu_type="CPU", prompt_lengths=(8, 8))
    c_path = tmp_path / "missing.json"
    with pytest.raises(PlanInputError, match="cannot read profile"):
        make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 1}], calibration=[str(c_path)])


def usage_app() -> FastAPI:
    """Streams like vLLM with continuous usage stats: one chunk carries two tokens, one carries text but no new token."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()

        async def stream():
            for completion_tokens, text in ((1, "a"), (3, "bc"), (3, " "), (4, ""), (5, "d")):
                chunk = {"choices": [{"text": text, "index": 0}],
                         "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": completion_tokens}}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.01)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def test_the_profiler_counts_tokens_as_the_load_test_does():
    """The profiler streams through loadtest.client: a token arrives when the server's count grows."""
    async def token_times():
        async with httpx.AsyncClient() as client:
            prober = Prober(client, normalize_base_url(server.url), "m", TINY.vocab_size, 0, 10.0)
            return await prober.token_times(8, 5)

    with ThreadedServer(usage_app()) as server:
        times = asyncio.run(token_times())
    # Four arrivals (counts 1, 3, 4, 5): the empty-text chunk is a token, the unchanged count is not.
    assert len(times) == 4
    assert times == sorted(times)


@pytest.mark.slow
def test_profile_a_real_vllm_server_on_cpu(tmp_path, tiny_model_dir):
    """Start `vllm serve` on the tiny model, profile it through the CLI, and fit the CPU entry."""
    port = free_tcp_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_dir, "--dtype", "float32",
         "--max-model-len", "1024", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, f"vllm exited: {proc.stderr.read()[-2000:]}"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "vllm did not come up in 240 s"
            time.sleep(1)
        out = tmp_path / "cpu.json"
        code = main(["profile", "--url", url, "--gpu-type", "CPU", "--hf-config", tiny_model_dir, "--out", str(out),
                     "--prompt-lengths", "16,128,384", "--batch-sizes", "1,4", "--decode-tokens", "16", "--repeats", "2"])
        assert code == 0
        profile = load_profile(out)
        assert len(profile.prefill) == 3 and len(profile.decode) == 2
        assert profile.prefill[-1].latency_ms > profile.prefill[0].latency_ms  # longer prompts take longer
        fit = fit_profile(profile, CPU)
        assert 0 < fit.mfu <= 1 and 0 < fit.mbu <= 1
        # The fitted profile plans the embedded default.
        data = json.loads((REPO / "configs" / "embedded_default.json").read_text())
        data["calibration"] = [str(out)]
        cluster_file = tmp_path / "embedded.json"
        cluster_file.write_text(json.dumps(data))
        assert main(["solve", str(cluster_file), "--out", str(tmp_path / "plan.json"), "--time-limit", "5",
                     "--quiet"]) == 0
        assert json.loads((tmp_path / "plan.json").read_text())["predicted"]["throughput_rps"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
