"""Typed reads from parsed JSON that fail with the field's path and what is allowed.

The cluster file, the GPU catalog and profile files are all read through
``Fields`` so that every validation error has the same shape:
``workload.slo.ttft_ms: must be a number > 0, got 'fast'``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from planner.spec.errors import PlanInputError

_MISSING: Any = object()


def read_json_file(path: Path | str, field: str = "", what: str = "file") -> Any:
    """The parsed JSON of ``path``; anything that stops it (missing, a folder,
    not UTF-8 text, not JSON) is a ``PlanInputError`` naming the file and the
    fix, so the command line prints one line instead of a traceback."""
    shown = repr(str(path))
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise PlanInputError(field, f"{shown} is a folder; give the path of the {what} itself") from None
    except OSError as exc:
        raise PlanInputError(field, f"cannot read {what} {shown}: {exc.strerror}; check the path") from None
    except UnicodeDecodeError as exc:
        raise PlanInputError(field, f"{what} {shown} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                                    f"{exc.start}); give a JSON file saved as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanInputError(field, f"{what} {shown} is not valid JSON: line {exc.lineno}, column {exc.colno}: "
                                    f"{exc.msg}; fix the file there") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """A JSON object being read, with its path for error messages."""

    __slots__ = ("data", "path")

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise PlanInputError(path, f"must be a JSON object, got {_show(data)}")
        self.data = data
        self.path = path

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data and self.data[name] is not None

    def check_keys(self, allowed: set[str] | frozenset[str]) -> None:
        """Reject unknown keys: a typo should fail loudly, not be ignored."""
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise PlanInputError(
                self.at(unknown[0]),
                f"unknown field; allowed here: {', '.join(sorted(allowed))}",
            )

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        if not self.has(name):
            if default is _MISSING:
                raise PlanInputError(self.at(name), "is required")
            return default
        return self.data[name]

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        above: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        return check_number(value, self.at(name), minimum=minimum, above=above, maximum=maximum)

    def integer(
        self, name: str, default: Any = _MISSING, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise PlanInputError(self.at(name), f"must be an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            raise PlanInputError(self.at(name), f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise PlanInputError(self.at(name), f"must be <= {maximum}, got {value}")
        return value

    def string(self, name: str, default: Any = _MISSING, *, choices: Any = None) -> str:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            raise PlanInputError(self.at(name), f"must be a non-empty string, got {_show(value)}")
        if choices is not None and value not in choices:
            raise PlanInputError(
                self.at(name), f"{value!r} is not allowed; choose one of: {', '.join(sorted(choices))}"
            )
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise PlanInputError(self.at(name), f"must be true or false, got {_show(value)}")
        return value

    def obj(self, name: str, default: Any = _MISSING) -> Fields:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return Fields({}, self.at(name)) if value is None else Fields(value, self.at(name))
        return Fields(value, self.at(name))

    def items(self, name: str, default: Any = _MISSING, *, min_items: int = 0) -> Iterator[tuple[str, Any]]:
        """Yield (path, element) for a JSON list field."""
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            value = value or []
        if not isinstance(value, list):
            raise PlanInputError(self.at(name), f"must be a list, got {_show(value)}")
        if len(value) < min_items:
            raise PlanInputError(self.at(name), f"must have at least {min_items} entr{'y' if min_items == 1 else 'ies'}")
        for i, element in enumerate(value):
            yield f"{self.at(name)}[{i}]", element


def check_number(
    value: Any,
    path: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
) -> float:
    """Validate one JSON number against optional bounds."""
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    allowed = "a number" + (f" {' and '.join(bounds)}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanInputError(path, f"must be {allowed}, got {_show(value)}")
    if (
        (minimum is not None and value < minimum)
        or (above is not None and value <= above)
        or (maximum is not None and value > maximum)
    ):
        raise PlanInputError(path, f"must be {allowed}, got {value:g}")
    return float(value)
