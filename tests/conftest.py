"""Session-wide fixtures: the tiny model and one colocated reference engine.

Each vLLM CPU engine costs ~30 s to start, so tests across areas share the
same reference engine instead of starting their own.
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from engine.tiny_model import build_tiny_model

    return str(build_tiny_model())


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir):
    """One colocated vLLM engine (prefill and decode in one) serving the tiny model."""
    from vllm import LLM

    from engine.config import tiny_model_settings

    settings = tiny_model_settings(model=tiny_model_dir)
    settings.apply_process_env()
    llm = LLM(**settings.engine_kwargs())
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()



@pytest.fixture(scope="session")
def embedded_router(tmp_path_factory, tiny_model_dir):
    """`python -m router serve` (the embedded default: one prefill, one decode worker), with an API key."""
    from router_process import EMBEDDED_API_KEY, start_router

    router = start_router(tmp_path_factory.mktemp("embedded-router"), api_key=EMBEDDED_API_KEY)
    yield router
    router.stop()
