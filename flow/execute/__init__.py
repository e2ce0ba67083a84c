"""Executors: calls in, results out.

An executor takes a stream of distinct `Call`s and hands each one's `CallResult` to
`deliver`, whose return means the result is on disk; how it gets there (requests in flight
with retries, or a batch file) is its own affair. `online.OnlineExecutor` is the one today.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from flow.records import Call, CallResult

Deliver = Callable[[CallResult], Awaitable[None]]
# yielded by a source between calls to a packing executor: send what is gathered, do not
# wait for more (more may come only once those are sent)
FLUSH = None


@dataclass(slots=True)
class ExecutorCounters:
    """Run-wide counts the progress display reads."""

    attempts: int = 0
    retries: int = 0
    rate_limited: int = 0
    in_flight: int = 0


@dataclass(slots=True)
class BatchCounters(ExecutorCounters):
    """The Batch API executor's counts, with its batches'."""

    batches_submitted: int = 0
    batches_running: int = 0
    batches_collected: int = 0
    lines_done: int = 0
    lines_total: int = 0


class Executor(Protocol):
    """Sends calls and delivers how each one ended (each executor keeps its run-wide
    counts in `counters`, an `ExecutorCounters`)."""

    async def execute(self, calls: AsyncIterable[Call], deliver: Deliver) -> None:
        """Send every call of `calls`; await `deliver` with each result before the next."""
        ...


async def calls_of(source: AsyncIterable[Call | None]) -> AsyncIterator[Call]:
    """The calls of a source, without its `FLUSH`es (for an executor that does not pack)."""
    async for call in source:
        if call is not None:
            yield call
