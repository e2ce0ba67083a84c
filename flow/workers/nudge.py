"""A count of changes a worker makes (work queued, a result committed), which its stages
that wait for work watch."""

from __future__ import annotations

import asyncio
import contextlib


class Nudge:
    """A count of changes (work queued, a result committed), and a wait for the next one
    that misses none made after a look."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._event.set()
        self._event = asyncio.Event()

    async def after(self, count: int, timeout_s: float) -> None:
        """Return once the count has passed `count`, or after `timeout_s`."""
        if self.count == count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout_s)
