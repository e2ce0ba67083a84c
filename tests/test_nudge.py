"""A worker's count of changes, and the wait for the next one its waiting stages make."""

from __future__ import annotations

import asyncio

import pytest

from flow.workers.nudge import Nudge


async def test_a_wait_cancelled_as_a_change_comes_ends_cancelled() -> None:
    # a worker cancelled just as one of its results was committed: its stage waiting for
    # work must end, or whoever cancelled the worker waits for it for good
    nudge = Nudge()
    waiting = asyncio.create_task(nudge.after(nudge.count, 60))
    await asyncio.sleep(0)  # it waits for the next change
    nudge()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 10)


async def test_a_wait_ends_at_a_change_or_its_timeout() -> None:
    nudge = Nudge()
    seen = nudge.count
    waiting = asyncio.create_task(nudge.after(seen, 60))
    await asyncio.sleep(0)
    nudge()
    await asyncio.wait_for(waiting, 10)
    await nudge.after(seen, 60)  # passed already: no wait
    await nudge.after(nudge.count, 0)  # nothing comes: the timeout
