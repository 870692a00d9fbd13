"""The import layers (pyproject.toml [tool.importlinter]) hold: import-linter
checks every contract, and a back-edge added on purpose breaks one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_every_layer_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_back_edge_breaks_the_layers(tmp_path):
    """common must not import the router: add that import to a copy of the tree and lint it."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "__pycache__", "*.egg-info"))
    with open(tree / "common" / "roles.py", "a") as f:
        f.write("\nimport router.serve  # a back-edge, on purpose\n")
    env_path = f"{tree}"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=tree, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "common.roles -> router.serve" in result.stdout, result.stdout
