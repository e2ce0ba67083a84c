"""The hand-over between two stages of a chain: items the earlier stage finished, waiting
for the later one to plan them.

Bounded, so an earlier stage that runs ahead (a re-run where everything upstream is done)
waits instead of holding the whole input in memory; closed by a later stage that stops, so
the stage before it never waits for a reader that is gone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded queue of items with an end (no more will come) and a close (no one reads)."""

    def __init__(self, limit: int) -> None:
        self._items: deque[T] = deque()
        self._limit = limit
        self._changed = asyncio.Condition()
        self._ended = False
        self.closed = False

    def __len__(self) -> int:
        """Items waiting to be taken."""
        return len(self._items)

    async def put(self, items: Sequence[T]) -> None:
        """Add `items` once there is room; dropped when the reader is gone."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) < self._limit or self.closed)
            if not self.closed:
                self._items.extend(items)
                self._changed.notify_all()

    async def take(self, most: int) -> list[T] | None:
        """Up to `most` items, waiting for the first; None once it has ended and is empty."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items) or self._ended or self.closed)
            if not self._items:
                return None
            batch = [self._items.popleft() for _ in range(min(most, len(self._items)))]
            self._changed.notify_all()
            return batch

    async def end(self) -> None:
        """No more items will come: the reader takes what is left, then None."""
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def close(self) -> None:
        """The reader is gone: what waits is dropped (those items stay pending in the
        store), and senders no longer wait."""
        async with self._changed:
            self.closed = True
            self._items.clear()
            self._changed.notify_all()
