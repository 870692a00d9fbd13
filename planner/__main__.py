"""Command line: ``python -m planner solve cluster.json`` and friends.

    python -m planner solve configs/two_type_16.json --out plan.json --plot plan.png
    python -m planner solve configs/small_exact_8.json --solver exact
    python -m planner profile --url http://127.0.0.1:8100 --gpu-type CPU --hf-config MODEL_DIR --out profile.json
    python -m planner calibrate profile.json
    python -m planner catalog
    python -m planner simulate plan.json --trace azure-conv
    python -m planner control --router http://127.0.0.1:8000 --cluster cluster.json --plan plan.json

Exit status: 0 on success, 2 for bad input (the message names the field), 3
for a fleet that cannot hold the model (the message gives the shortfall).
The subcommands live in ``planner/adapters/cli.py``.
"""

from __future__ import annotations

import sys

from planner.adapters.cli import build_parser
from planner.spec.errors import InfeasibleFleetError, PlanInputError

EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    try:
        return args.func(args)
    except InfeasibleFleetError as exc:
        print(f"infeasible: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except PlanInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
