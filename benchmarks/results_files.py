"""Where a benchmark's results go: its JSON and its markdown table, side by side in benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, document: dict, header: list[str], rows: list[list[str]]) -> str:
    """results/<name>.json and results/<name>.md (a table: `header`, then one line per row); the table, printed."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=2))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
    return table
