"""`vllm bench serve` drives the router unchanged, with its openai and openai-chat backends
(issue 17), including its prompt alignment through the router's /tokenize and /detokenize."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tiny_model import TINY_MODEL_NAME

pytestmark = pytest.mark.slow

VLLM = str(Path(sys.executable).with_name("vllm"))


@pytest.mark.parametrize("backend, endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_against_the_router(embedded_router, tiny_model_dir, backend, endpoint):
    from router_process import EMBEDDED_API_KEY

    done = subprocess.run(
        [VLLM, "bench", "serve", "--backend", backend, "--base-url", embedded_router.base_url, "--endpoint", endpoint,
         "--model", TINY_MODEL_NAME, "--tokenizer", tiny_model_dir, "--dataset-name", "random",
         "--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "4", "--request-rate", "inf"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OPENAI_API_KEY=EMBEDDED_API_KEY))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"Successful requests:\s+4\b", output) and re.search(r"Failed requests:\s+0\b", output), output[-3000:]
    assert "/tokenize unavailable" not in output
