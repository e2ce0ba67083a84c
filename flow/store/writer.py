"""The group commit: one writer task commits whatever results arrived since its last commit.

A received reply waits in memory only for the commit in progress (a few milliseconds), never
for a batch to fill; `save` returns once its result is on disk. Any failure in a commit
stops the writer with a `StoreError` that every waiting and later caller gets: it never
dies quietly and leaves callers waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flow.errors import StoreError
from flow.records import Settled

MAX_GROUP = 2000

Commit = Callable[[list[Settled]], Awaitable[None]]
_Pending = tuple[Settled | None, asyncio.Future[None], float]


@dataclass(slots=True)
class CommitTimes:
    """How long results waited in memory before they were on disk, for the `runs` row."""

    committed: int = 0
    groups: int = 0
    wait_total_ms: float = 0.0
    wait_max_ms: float = 0.0

    @property
    def wait_mean_ms(self) -> float:
        """Mean time a result waited in memory before it was on disk."""
        return self.wait_total_ms / self.committed if self.committed else 0.0


class GroupWriter:
    """Commits `Settled` results in groups through `commit`, which raises `StoreError`."""

    def __init__(self, commit: Commit, describe: Callable[[Exception], StoreError]) -> None:
        self._commit = commit
        self._describe = describe
        self._pending: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.failure: StoreError | None = None
        self.times = CommitTimes()
        self._writing: list[asyncio.Future[None]] = []  # the waiters of the group in hand
        self._stopped = False

    def start(self) -> None:
        """Start the writer task (on the running event loop)."""
        self._task = asyncio.create_task(self._write_forever())

    async def save(self, settled: Settled) -> None:
        """Commit `settled`; returns once it is on disk, grouped with its neighbours."""
        await self._enqueue(settled)

    async def flush(self) -> None:
        """Wait until every result queued before is committed."""
        if self._task is None or self._task.done():
            self._raise_failure()
            return
        await self._enqueue(None)

    async def stop(self) -> None:
        """Stop the writer task; results not yet committed stay uncommitted, and whoever
        waits for them (or saves later) gets a `StoreError` rather than wait for good."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._stopped = True
        waiters = list(self._writing)
        while not self._pending.empty():
            waiters.append(self._pending.get_nowait()[1])
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(_closed())

    async def _enqueue(self, settled: Settled | None) -> None:
        self._raise_failure()
        if self._stopped:
            raise _closed()
        done = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((settled, done, time.monotonic()))
        await done
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _write_forever(self) -> None:
        while True:
            group = [await self._pending.get()]
            while len(group) < MAX_GROUP and not self._pending.empty():
                group.append(self._pending.get_nowait())
            self._writing = [waiter for _, waiter, _ in group]
            settled = [item for item, _, _ in group if item is not None]
            if settled and self.failure is None:
                try:
                    await self._commit(settled)
                except Exception as e:  # any failure stops the writer clearly, never a hang
                    self.failure = self._describe(e)
                self._time(group)
            for _, waiter, _ in group:
                if not waiter.done():
                    waiter.set_result(None)

    def _time(self, group: list[_Pending]) -> None:
        now = time.monotonic()
        times = self.times
        times.groups += 1
        for settled, _, queued in group:
            if settled is not None:
                wait_ms = (now - queued) * 1000
                times.wait_max_ms = max(times.wait_max_ms, wait_ms)
                times.wait_total_ms += wait_ms
                times.committed += 1


def _closed() -> StoreError:
    return StoreError("the store was closed before these results were committed")
