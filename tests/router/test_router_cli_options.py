"""`python -m router serve` options: a setting that the chosen routing cannot honour is refused."""

from __future__ import annotations

import pytest

from router.__main__ import main


@pytest.mark.parametrize("argv, message", [
    (["--routing", "plan", "--decode-first-max-tokens", "64"],
     "--decode-first-max-tokens applies to --routing cache-aware only (got --routing plan)"),
    (["--routing", "round-robin", "--share-slack-requests", "8"],
     "--share-slack-requests applies to --routing cache-aware only (got --routing round-robin)"),
    (["--share-slack-requests", "-1"], "-1 must be >= 0"),
    (["--max-migrations", "x"], "'x' is not a number"),
    (["--block-size", "0"], "0 must be >= 1"),
])
def test_bad_or_unhonourable_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_routers_warnings_and_plan_change_steps_survive_vllms_openai_layer():
    """vLLM's OpenAI layer imports a package that sets the root logger to ERROR at import
    (model_hosting_container_standards); the router's own lines must still show."""
    import subprocess
    import sys

    script = ("import logging; from router.__main__ import configure_logging; configure_logging(False); "
              "import model_hosting_container_standards.logging_config; "
              "logging.getLogger('router.serve').warning('worker w had exited; started it again'); "
              "logging.getLogger('router.plan_changes').info('plan change 1: done'); "
              "logging.getLogger('router.cluster').info('not shown by default')")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("SAGEMAKER_CONTAINER_LOG_LEVEL", "LOG_LEVEL",
                                                                          "HEXSERVE_LOG_LEVEL")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "worker w had exited; started it again" in out.stderr and "plan change 1: done" in out.stderr
    assert "not shown by default" not in out.stderr
