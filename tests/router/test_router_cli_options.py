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
