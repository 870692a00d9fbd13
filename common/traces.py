"""Request traces: parse Azure LLM, BurstGPT and Mooncake files into one record type.

The one trace reader: the planner (a workload's length moments and rate), the
simulator and the load test all read traces here, so a file means the same
thing to each of them. Every format becomes a list of `TraceRequest` (arrival
time relative to the first request, prompt and output lengths, optional prefix
hash ids); `detect_format` is the one rule that tells the formats apart. Parsing is strict:
a bad line raises `TraceError` naming the file, the 1-based line number, the
field and what a valid value looks like, because a silently skipped line would
change the measured load.

Formats:
- Azure LLM inference (2023): CSV `TIMESTAMP,ContextTokens,GeneratedTokens`,
  wall-clock timestamps such as `2023-11-16 18:15:46.6805900`.
- BurstGPT: CSV `Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`,
  timestamps in seconds.
- Mooncake: JSONL, one object per line with `timestamp` (ms), `input_length`,
  `output_length`, `hash_ids` (ids of 512-token prefix blocks; equal ids mean an
  equal prompt prefix).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# CI clones the repository with shared/ beside it.
SHARED_TRACES_DIR = REPO_ROOT.parent / "shared" / "traces"

# Short names for the traces shipped in ../shared/traces.
KNOWN_TRACES = {
    "azure-conv": "azure_llm_2023_conv.csv",
    "azure-code": "azure_llm_2023_code.csv",
}

MOONCAKE_BLOCK_TOKENS = 512

TRACE_FORMATS = ("azure", "burstgpt", "mooncake")  # and "auto": `detect_format`

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names file, line and fix."""


@dataclass(slots=True)
class TraceRequest:
    arrival_s: float  # seconds after the first request of the trace
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = field(default_factory=tuple)
    line_no: int = 0  # where it came from, for later error messages


def resolve_trace_path(name_or_path: str | Path) -> Path:
    """A short name (`azure-conv`), a file name in ../shared/traces, or any path."""
    text = str(name_or_path)
    if text in KNOWN_TRACES:
        path = SHARED_TRACES_DIR / KNOWN_TRACES[text]
    else:
        path = Path(text)
        if not path.exists() and (SHARED_TRACES_DIR / text).exists():
            path = SHARED_TRACES_DIR / text
    if not path.exists():
        raise TraceError(
            f"trace {text!r} not found; pass --trace PATH to a CSV/JSONL file or one of "
            f"{sorted(KNOWN_TRACES)} (looked in {SHARED_TRACES_DIR})"
        )
    return path


def detect_format(path: Path) -> str:
    """'azure', 'burstgpt' or 'mooncake', from the extension and the header line."""
    with path.open("r", encoding="utf-8") as f:
        first = f.readline().strip()
    if path.suffix in (".jsonl", ".json") or first.startswith("{"):
        return "mooncake"
    header = [h.strip() for h in first.split(",")]
    if "ContextTokens" in header or "TIMESTAMP" in header:
        return "azure"
    if "Request tokens" in header or "Response tokens" in header:
        return "burstgpt"
    raise TraceError(
        f"{path}:1: cannot tell the trace format from the header {first[:120]!r}; "
        f"expected Azure columns {','.join(AZURE_COLUMNS)}, BurstGPT columns "
        f"{','.join(BURSTGPT_COLUMNS)}, or Mooncake JSONL objects"
    )


def load_trace(name_or_path: str | Path, fmt: str = "auto") -> list[TraceRequest]:
    """Parse a trace file; arrival times start at 0 and never decrease."""
    path = resolve_trace_path(name_or_path)
    if fmt == "auto":
        fmt = detect_format(path)
    parsers = {"azure": _parse_azure, "burstgpt": _parse_burstgpt, "mooncake": _parse_mooncake}
    if fmt not in parsers:
        raise TraceError(f"unknown trace format {fmt!r}; use one of {sorted(parsers)} or 'auto'")
    requests = parsers[fmt](path)
    if not requests:
        raise TraceError(f"{path}: the trace holds no requests")
    return requests


def _parse_int(path: Path, line_no: int, name: str, text: str) -> int:
    try:
        value = int(float(text))
    except (TypeError, ValueError):
        raise TraceError(
            f"{path}:{line_no}: {name} {text!r} is not a number; it must be a token count >= 0"
        ) from None
    if value < 0:
        raise TraceError(f"{path}:{line_no}: {name} is {value}; token counts must be >= 0")
    return value


class _Timeline:
    """Arrival times relative to a trace's first request; refuses a timestamp that goes back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.first_s: float | None = None
        self.prev_s: float | None = None

    def arrival_s(self, line_no: int, t_s: float) -> float:
        if self.prev_s is not None and t_s < self.prev_s:
            raise TraceError(
                f"{self.path}:{line_no}: timestamp goes back in time ({t_s:.6f} s < {self.prev_s:.6f} s "
                f"on the previous request); sort the trace by timestamp first"
            )
        if self.first_s is None:
            self.first_s = t_s
        self.prev_s = t_s
        return t_s - self.first_s


def _csv_rows(path: Path, required: tuple[str, ...]):
    f = path.open("r", encoding="utf-8", newline="")
    reader = csv.DictReader(f, skipinitialspace=True)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        f.close()
        raise TraceError(
            f"{path}:1: missing column(s) {missing}; the header is {header}, "
            f"expected at least {list(required)}"
        )
    reader.fieldnames = header
    try:
        # Line 1 is the header, so the first data row is line 2.
        for line_no, row in enumerate(reader, start=2):
            yield line_no, row
    finally:
        f.close()


def _azure_time_s(path: Path, line_no: int, text: str) -> float:
    # Python's datetime keeps 6 fractional digits; Azure writes 7 (100 ns).
    text = text.strip()
    base, _, frac = text.partition(".")
    try:
        seconds = datetime.fromisoformat(base).timestamp()
        return seconds + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise TraceError(
            f"{path}:{line_no}: TIMESTAMP {text!r} is not a date-time like "
            f"'2023-11-16 18:15:46.6805900'"
        ) from None


def _parse_azure(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    timeline = _Timeline(path)
    for line_no, row in _csv_rows(path, AZURE_COLUMNS):
        arrival_s = timeline.arrival_s(line_no, _azure_time_s(path, line_no, row["TIMESTAMP"] or ""))
        out.append(TraceRequest(
            arrival_s=arrival_s,
            input_tokens=_parse_int(path, line_no, "ContextTokens", row["ContextTokens"]),
            output_tokens=_parse_int(path, line_no, "GeneratedTokens", row["GeneratedTokens"]),
            line_no=line_no,
        ))
    return out


def _parse_burstgpt(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    timeline = _Timeline(path)
    for line_no, row in _csv_rows(path, BURSTGPT_COLUMNS):
        try:
            t_s = float(row["Timestamp"])
        except (TypeError, ValueError):
            raise TraceError(
                f"{path}:{line_no}: Timestamp {row['Timestamp']!r} is not a number of seconds"
            ) from None
        out.append(TraceRequest(
            arrival_s=timeline.arrival_s(line_no, t_s),
            input_tokens=_parse_int(path, line_no, "Request tokens", row["Request tokens"]),
            output_tokens=_parse_int(path, line_no, "Response tokens", row["Response tokens"]),
            line_no=line_no,
        ))
    return out


def _parse_mooncake(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    timeline = _Timeline(path)
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in MOONCAKE_FIELDS if k not in obj]
            if missing:
                raise TraceError(
                    f"{path}:{line_no}: missing field(s) {missing}; each line needs "
                    f"{list(MOONCAKE_FIELDS)} and optionally hash_ids"
                )
            try:
                t_s = float(obj["timestamp"]) / 1000.0  # Mooncake writes milliseconds
            except (TypeError, ValueError):
                raise TraceError(
                    f"{path}:{line_no}: timestamp {obj['timestamp']!r} is not a number of ms"
                ) from None
            arrival_s = timeline.arrival_s(line_no, t_s)
            hash_ids = obj.get("hash_ids") or []
            if not isinstance(hash_ids, list) or not all(isinstance(h, int) for h in hash_ids):
                raise TraceError(f"{path}:{line_no}: hash_ids must be a list of integers")
            out.append(TraceRequest(
                arrival_s=arrival_s,
                input_tokens=_parse_int(path, line_no, "input_length", obj["input_length"]),
                output_tokens=_parse_int(path, line_no, "output_length", obj["output_length"]),
                hash_ids=tuple(hash_ids),
                line_no=line_no,
            ))
    return out
