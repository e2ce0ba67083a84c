"""The Batch API executor: calls gathered into shards, each sent as one batch at half price,
polled, and collected into the same store, through the same content keys, as online calls.

Each shard walks its states in `batch_shard` (never a second batch for a shard, whatever
moment the process dies). Expired and cancelled lines go back to pending without using an
attempt (`on_expired`: a new batch, or online). A run stopped (Ctrl-C, `--detach`) leaves
every batch running at the provider; the next run reattaches and collects, never creating
again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable

import openai

from flow.config import StageConfig
from flow.execute import BatchCounters, Deliver
from flow.execute.batch_run import BatchRun
from flow.execute.batch_shard import ShardDriver
from flow.records import Call, Shard

__all__ = ["BatchExecutor", "BatchRun"]


class BatchExecutor:
    """Sends calls through the Batch API; see the module docstring."""

    def __init__(self, config: StageConfig, client: openai.AsyncOpenAI, run: BatchRun,
                 stop: asyncio.Event, detach: bool = False,
                 fallback: Callable[[list[Call], Deliver], Awaitable[None]] | None = None
                 ) -> None:
        self._config = config.batch
        self._run = run
        self._stop = stop
        self._fallback = fallback  # on_expired: online
        self.counters = BatchCounters()
        self._driver = ShardDriver(config.batch, client, run, stop, detach, self.counters)
        self._drive = self._driver.drive
        self._shard_ids: list[int] = []  # open when the run began, or made by it

    @property
    def stopped_by_budget(self) -> bool:
        """A batch was not created: it could have taken spend past `max_cost_usd`."""
        return self._driver.stopped_by_budget

    async def execute(self, calls: AsyncIterable[Call], deliver: Deliver) -> None:
        """Shard the calls not already in a batch, drive every open shard to its end (or,
        detached or stopped, until it is submitted), and deliver each line's result."""
        run = self._run
        drivers: set[asyncio.Task[None]] = set()
        for shard in await run.book.open(run.stage, run.origin):
            self._count_open(shard)
            self._shard_ids.append(shard.id)
            drivers.add(asyncio.create_task(self._drive(shard, deliver)))
        await self._shard(calls, drivers, deliver)
        while drivers:
            done, drivers = await asyncio.wait(drivers, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            if not drivers and self._driver.requeued and not self._stop.is_set():
                requeued, self._driver.requeued = self._driver.requeued, []
                if self._config.on_expired == "online" and self._fallback is not None:
                    await self._fallback(requeued, deliver)
                else:
                    drivers = {asyncio.create_task(self._drive(shard, deliver))
                               for shard in await self._cut(requeued)}

    async def _shard(self, calls: AsyncIterable[Call], drivers: set[asyncio.Task[None]],
                     deliver: Deliver) -> None:
        """Gather calls into shards: cut when full, when calls stop coming for `gather_s`,
        and at the end; a call whose request a batch holds already waits for that batch."""
        queue: asyncio.Queue[Call | None] = asyncio.Queue(maxsize=10_000)

        async def pump() -> None:
            try:
                async for call in calls:
                    await queue.put(call)
            finally:
                await queue.put(None)

        pumping = asyncio.create_task(pump())
        gathered: list[Call] = []
        taken: set[str] = set()
        try:
            while True:
                try:
                    timeout = self._config.gather_s if gathered else None
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a
                    # cancel that comes with a call
                    async with asyncio.timeout(timeout):
                        first = await queue.get()
                except TimeoutError:
                    for shard in await self._cut(gathered):
                        drivers.add(asyncio.create_task(self._drive(shard, deliver)))
                    gathered, taken = [], set()
                    continue
                chunk = [first]
                while chunk[-1] is not None and not queue.empty() and len(chunk) < 1000:
                    chunk.append(queue.get_nowait())
                ended = chunk[-1] is None
                fresh = [call for call in chunk if call is not None and call.key not in taken]
                # a request a batch holds (or answered, while it was being planned) waits
                # for that batch: it is delivered from the store
                held = await self._run.book.held(self._shard_ids, [call.key for call in fresh])
                for call in fresh:  # items that render one request share one line
                    if call.key not in held and call.key not in taken and (
                            call.key not in self._driver.requeued_keys):
                        gathered.append(call)
                        taken.add(call.key)
                if ended or self._stop.is_set():
                    break
                if len(gathered) >= self._config.max_requests_per_batch:
                    for shard in await self._cut(gathered):
                        drivers.add(asyncio.create_task(self._drive(shard, deliver)))
                    gathered, taken = [], set()
            if not self._stop.is_set():
                for shard in await self._cut(gathered):
                    drivers.add(asyncio.create_task(self._drive(shard, deliver)))
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)

    async def _cut(self, calls: list[Call]) -> list[Shard]:
        """Record `calls` as shards of at most `max_requests_per_batch` lines,
        `max_bytes_per_batch` bytes and `max_enqueued_tokens` tokens, `planned`."""
        shards: list[Shard] = []
        limit = self._config
        most_tokens = limit.max_enqueued_tokens
        lines: list[tuple[str, str]] = []
        size = tokens = 0
        for call in calls:
            line = len(call.request_json) + 120
            line_tokens = self._run.worst_tokens(call.request_json)
            if lines and (len(lines) >= limit.max_requests_per_batch
                          or size + line > limit.max_bytes_per_batch
                          or (most_tokens is not None and tokens + line_tokens > most_tokens)):
                shards.append(await self._add(lines))
                lines, size, tokens = [], 0, 0
            lines.append((call.key, call.request_json))
            size += line
            tokens += line_tokens
        if lines:
            shards.append(await self._add(lines))
        return shards

    async def _add(self, lines: list[tuple[str, str]]) -> Shard:
        run = self._run
        worst = sum(run.worst_cost(request) for _, request in lines)
        shard = await run.book.add(run.stage, run.origin, run.url, worst, lines, run.run_id)
        self._shard_ids.append(shard.id)
        self.counters.lines_total += shard.lines
        return shard

    def _count_open(self, shard: Shard) -> None:
        self.counters.lines_total += shard.lines
        if shard.state in ("submitted", "terminal"):
            self.counters.batches_submitted += 1
            self.counters.batches_running += shard.state == "submitted"
