"""A worker's share of a batch stage (`executor: batch`) on a shared store.

The worker takes over any open shard no live worker drives (its driver died, was paused past
its lease, or stopped), else cuts a new shard from the queue's pending requests, and walks
each through the same states as a one-process run (`execute.batch_shard.ShardDriver`), every
state fenced by the shard's lease (`store.postgres.shard_leases`). Each line's result is
committed for every item waiting on its request, fenced by the request's token in `work`, as
an online worker's result is. Lines a batch did not run go back to the queue (or, with
`on_expired: online`, are sent online under their leases). The worker ends when no request
waits and every shard is collected (other workers' too: it takes them over if they die).

A later stage of a chain gets its requests as the stages before it hand items on: it cuts
only full shards while more may come, a partial one after `batch.gather_s` seconds with no
new request or once the stages before it can hand nothing more on, and it does not end
before then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import openai

from flow.budget import Budget
from flow.errors import StoreError
from flow.execute import BatchCounters
from flow.execute.batch_run import BatchRun
from flow.execute.batch_shard import URLS, ShardDriver
from flow.execute.online import OnlineExecutor
from flow.prices import batch_price, estimate_call_usd
from flow.progress import RunProgress
from flow.records import Call, CallResult, Shard
from flow.stage import Stage
from flow.store.postgres.shard_leases import ShardLostError, SharedShards
from flow.store.postgres.store import PostgresStore
from flow.store.shards import Waiting

LINE_BYTES = 120  # a line's envelope around its request (custom_id, method, url)
# lines of a collection committing at once: the store's group writer takes them in a few
# transactions where one at a time took a round trip each
IN_FLIGHT = 256


class BatchWork:
    """Drives the batches of one stage from this worker; `await execute()` until done."""

    def __init__(self, stage: Stage, store: PostgresStore, client: openai.AsyncOpenAI,
                 online: OnlineExecutor, origin: str, store_tag: str, lease_s: float,
                 poll_s: float, stop: asyncio.Event, budget: Budget,
                 progress: RunProgress, first: str, detach: bool = False,
                 wait_for_work: bool = False,
                 before_done: Callable[[], Awaitable[bool]] | None = None) -> None:
        self._stage = stage
        self._first = first  # the chain's first stage: where each item's input is kept
        # whether the stages before this one can hand nothing more on (None: a first
        # stage, whose requests the plan queued)
        self._before_done = before_done
        self._gathering = (0, 0.0)  # requests waiting for a shard, and since when
        self._config = stage.config.batch
        self._store = store
        self._online = online
        self._stop = stop
        self._budget = budget
        self._progress = progress
        self._poll_s = min(poll_s, self._config.max_poll_s)
        self._book = SharedShards(store, stage.name, origin, lease_s)
        self._url = URLS[stage.config.endpoint]
        price = batch_price(stage.price)
        cap = stage.reserve.cap
        self._worst_cost: Callable[[str], float] = (
            lambda request: estimate_call_usd(price, request, cap))
        self._worst_tokens: Callable[[str], int] = lambda request: len(request) // 4 + cap
        self._run = BatchRun(self._book, stage.name, origin, store_tag, store.run_id,
                             self._may_spend, self._worst_cost, self._worst_tokens, self._url)
        self.counters = BatchCounters()
        self._detach = detach  # return once every shard is submitted
        self._wait_for_work = wait_for_work  # with nothing left: wait for more, not end
        self._client = client
        self._driver = ShardDriver(self._config, client, self._run, stop, detach, self.counters)
        self._origin = origin
        self._spent_before = 0.0
        self._worst_usd = 0.0  # the batches this worker created, each at its worst
        self._waiting: dict[str, list[Waiting]] = {}
        self._committing: set[asyncio.Task[None]] = set()
        self._room = asyncio.Semaphore(IN_FLIGHT)
        self._failure: Exception | None = None  # of a line's commit
        self._book.before_write = self._settle  # a line is marked done once committed
        self._loaded: set[str] = set()  # batches whose waiting items are looked up

    @property
    def detached(self) -> bool:
        """Detached with batches running at the provider: a later run collects them."""
        return self._detach and self.counters.batches_running > 0

    @property
    def holding(self) -> bool:
        """Lines of this worker's shards are not yet committed (nor handed on)."""
        return bool(self._book.line_tokens or self._committing)

    async def execute(self) -> None:
        """Drive shards until no request waits and every shard is collected (detached:
        submitted), or a stop."""
        if self._budget.cap_usd is not None:
            self._spent_before = await self._store.spent_usd(self._origin)
        drivers: dict[int, asyncio.Task[None]] = {}
        heart = asyncio.create_task(self._beat())
        try:
            while not self._stop.is_set():
                later = self._before_done is not None  # more requests may come
                shard = await self._book.take() or await self._cut(whole=later)
                if shard is None:
                    # looked at before what is left: an item handed on meanwhile is counted
                    ended = self._before_done is None or await self._before_done()
                    pending, unfinished = await self._book.left()
                    if pending and (ended or self._gathered(pending)):
                        shard = await self._cut()
                if shard is not None:
                    self._count(shard)
                    drivers[shard.id] = asyncio.create_task(self._drive(shard))
                    continue
                if ended and not drivers and not pending and (
                        not unfinished or self._detach) and not self._wait_for_work:
                    return
                # a driver ends, or another worker's lease may run out, meanwhile
                stop = asyncio.create_task(self._stop.wait())
                done, _ = await asyncio.wait({stop, *drivers.values()}, timeout=self._poll_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                for shard_id, task in list(drivers.items()):
                    if task in done:
                        del drivers[shard_id]
                        task.result()
        except BaseException:
            self._stop.set()  # the other shards' drivers stop too, and give their shards back
            raise
        finally:
            results = await asyncio.gather(*drivers.values(), return_exceptions=True)
            results.extend(await asyncio.gather(self._settle(), return_exceptions=True))
            heart.cancel()
            await asyncio.gather(heart, return_exceptions=True)
            with contextlib.suppress(Exception):  # a failed store says so already
                await self._book.release(list(self._book.tokens))
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _gathered(self, pending: int) -> bool:
        """Whether `pending` requests have waited `gather_s` with no new one coming."""
        now = asyncio.get_running_loop().time()
        if pending != self._gathering[0]:
            self._gathering = (pending, now)
        return now - self._gathering[1] >= self._config.gather_s

    async def _cut(self, whole: bool = False) -> Shard | None:
        """A new shard from the queue: at most `max_requests_per_batch` lines,
        `max_bytes_per_batch` bytes and `max_enqueued_tokens` tokens (`whole`: only a
        full one)."""
        config = self._config

        def fits(rows: list[tuple[str, str]]) -> int:
            size = tokens = 0
            for count, (_, request) in enumerate(rows):
                line, line_tokens = len(request) + LINE_BYTES, self._worst_tokens(request)
                if count and (size + line > config.max_bytes_per_batch or (
                        config.max_enqueued_tokens is not None
                        and tokens + line_tokens > config.max_enqueued_tokens)):
                    return count
                size, tokens = size + line, tokens + line_tokens
            return len(rows)

        return await self._book.cut(self._url, self._store.run_id,
                                    config.max_requests_per_batch, fits, self._worst_cost,
                                    whole)

    async def _drive(self, shard: Shard) -> None:
        """Walk one shard as far as this worker goes; send again what its batch did not run."""
        try:
            await self._driver.drive(shard, self._deliver)
        except ShardLostError:
            # another worker took it over: it goes on from the state on record
            await self._cancel_unrecorded(shard)
            return
        if self._driver.stopped_by_budget and not self._stop.is_set():
            self._progress.stopping = "budget reached"
            self._stop.set()
        requeued, self._driver.requeued = self._driver.requeued, []
        self._driver.requeued_keys.difference_update(call.key for call in requeued)
        if not requeued:
            return
        if self._config.on_expired == "online" and not self._stop.is_set():
            async def each() -> AsyncIterator[Call]:
                for call in requeued:
                    yield call
            await self._online.execute(each(), self._deliver)
            await self._settle()
        await self._book.requeue([call.key for call in requeued])  # those not sent

    async def _cancel_unrecorded(self, shard: Shard) -> None:
        """A batch this worker created after it lost the shard (it was paused past its lease
        between the intent and the create), when the worker holding the shard recorded
        another: nobody would collect it, so it is cancelled at once."""
        if shard.batch_id is None:
            return
        rows = await self._store._query("SELECT batch_id FROM batches WHERE id = %s",
                                        (shard.id,), raw=True)
        recorded = rows[0][0] if rows else None
        if recorded is not None and recorded != shard.batch_id:
            with contextlib.suppress(openai.APIError):
                await self._client.batches.cancel(shard.batch_id)

    async def _deliver(self, result: CallResult) -> None:
        """Commit one line's result, fenced by its request's lease."""
        key = result.call.key
        token = self._book.line_tokens.get(key)
        if token is None:
            return  # no longer this worker's: another worker committed or holds it
        if result.unsent:
            await self._book.requeue([key])
            return
        found = await self._waiting_for(result)
        await self._room.acquire()
        task = asyncio.create_task(self._commit(result, token, found))
        self._committing.add(task)
        task.add_done_callback(self._committing.discard)

    async def _commit(self, result: CallResult, token: int, found: list[Waiting]) -> None:
        """One line's result for every item waiting on it, committed fenced by `token`."""
        try:
            await self._stage.delivery.deliver_stored(result, lease=token, found=found)
            self._book.line_tokens.pop(result.call.key, None)
        except Exception as e:  # kept for `_settle`, which the collection awaits
            self._failure = self._failure or e
        finally:
            self._room.release()

    async def _settle(self) -> None:
        """Wait until every line delivered is committed; the first failure, if one failed."""
        while self._committing:
            await asyncio.gather(*self._committing, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    async def _waiting_for(self, result: CallResult) -> list[Waiting]:
        """The items waiting on the result's request, looked up once for its whole batch."""
        batch_id, key = result.batch_id, result.call.key
        if batch_id is not None and batch_id not in self._loaded:
            self._loaded.add(batch_id)
            keys = [str(k) for (k,) in await self._store._query(
                "SELECT request_key FROM batch_lines JOIN batches ON batches.id = "
                "batch_lines.batch WHERE batches.batch_id = %s AND batch_lines.state = "
                "'pending'", (batch_id,), raw=True)]
            for found in await self._store.shards.waiting_on(
                    self._stage.name, self._origin, keys, self._first):
                self._waiting.setdefault(found[2], []).append(found)
        if key in self._waiting:
            return self._waiting.pop(key)
        return await self._store.shards.waiting_on(self._stage.name, self._origin, [key],
                                                   self._first)

    def _may_spend(self, worst_usd: float) -> bool:
        """Whether a batch that may cost `worst_usd` fits `max_cost_usd` (what every worker
        paid before this one began, this one's spend, and its batches each at their worst);
        counted if so."""
        cap = self._budget.cap_usd
        if cap is None:
            return True
        spent = self._spent_before + self._progress.cost_usd + self._worst_usd
        if spent + worst_usd > cap:
            return False
        self._worst_usd += worst_usd
        return True

    def _count(self, shard: Shard) -> None:
        self.counters.lines_total += shard.lines
        if shard.state in ("submitted", "terminal"):
            self.counters.batches_submitted += 1
            self.counters.batches_running += shard.state == "submitted"

    async def _beat(self) -> None:
        """Keep this worker's shards while it drives them (their lines: the worker's own
        heartbeat keeps its leases in `work`)."""
        while True:
            await asyncio.sleep(self._book.lease_s / 3)
            with contextlib.suppress(StoreError):  # tried again at the next beat
                await self._book.heartbeat()
