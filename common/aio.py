"""Running an asyncio program on the fastest loop available."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine


def run_event_loop(main: Coroutine) -> None:
    """uvloop when installed (it comes with vLLM): a faster loop for many small messages."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
