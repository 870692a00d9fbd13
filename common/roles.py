"""The roles a worker (and a plan group) plays. One enum for the planner, the
simulator, the router and the workers: plan.json, /health and the worker
command lines all spell a role with these values."""

from __future__ import annotations

import enum


class Role(str, enum.Enum):
    PREFILL = "prefill"      # computes the prompt, ships its KV, returns one token
    DECODE = "decode"        # takes a prompt's KV from a prefill worker and generates
    COLOCATED = "colocated"  # one engine computes the prompt and generates (no KV transfer)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str, field: str = "role") -> Role:
        """The role named by `value`, or a ValueError naming `field` and the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(r.value for r in cls)
            raise ValueError(f"{field}={value!r} is not a role; use one of: {choices}") from None

    @property
    def serves_decode(self) -> bool:
        """Generates tokens for clients (decode and colocated workers)."""
        return self is not Role.PREFILL


ROLE_NAMES = tuple(r.value for r in Role)
