"""Bounded admission: at most `max_running` requests run, `max_waiting` wait; the rest get 429.

A full queue answers at once instead of letting latency grow without bound:
the client (or its load balancer) can back off or go elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class AdmissionRejected(RuntimeError):
    pass


@dataclass
class Admission:
    max_running: int = 256
    max_waiting: int = 1024
    waiting: int = 0
    running: int = 0
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0:
            raise ValueError(f"max_running={self.max_running} must be >= 1 and max_waiting={self.max_waiting} >= 0")

    def is_full(self) -> bool:
        """Every slot taken and the waiting line at its bound: a new request would be refused."""
        return self.running >= self.max_running and self.waiting >= self.max_waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        if self.is_full():
            raise AdmissionRejected(
                f"the server is at capacity ({self.running} running, {self.waiting} waiting); retry later"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
