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
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns, and drops a
            # cancel, when the event is set as the task is cancelled (a worker cancelled
            # just as a result came went on working, and its canceller waited for good)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
