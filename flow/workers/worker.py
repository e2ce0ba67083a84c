"""`flow worker`: one process that claims queued requests, sends them and commits results.

It needs the store's URL, the API key and the pipeline file (for its post steps and limits),
not the input: the requests are in the store. Every stage runs at once, each its own way:
an online stage is a `Lane`: it takes that stage's requests in batches under leases and
sends them through the same `OnlineExecutor` as a run, its pace behind the limit all
workers share (stages on one model share one), an embeddings stage's through the
`PackingExecutor` (a claim's inputs go `inputs_per_request` to a request, each item's result
committed under its own lease); a batch stage cuts its requests into shards
(`batching.py`), a later one only once the stages before it can hand nothing more on or its
shard is full. Each result is committed for every item waiting on its request, fenced by the
lease: a result whose lease another worker took is kept as a paid attempt, nothing more.
An item a commit finishes goes on to the next stage at once (`hand_on.py`): its request is
queued for any worker. The worker beats its heart while it works, and ends when no request
is left anywhere and nothing it handed on is still being planned, or on a stop; leases of
requests it never sent are given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from flow.budget import Breaker, Budget, Verdict
from flow.config import PipelineConfig, check_api_key
from flow.config.store_url import store_url
from flow.endpoints import endpoint_origin, endpoint_url
from flow.errors import ConfigError, FatalCallError, StoreError
from flow.execute import FLUSH, ExecutorCounters, calls_of
from flow.execute.sending import StageSender
from flow.plan import RunOptions
from flow.prices import estimate_call_usd
from flow.progress import RunProgress, RunSummary
from flow.records import Call, CallResult
from flow.run import DETACHED
from flow.stage import RunContext, Stage
from flow.store.postgres.connect import IDLE_IN_TRANSACTION_S
from flow.store.postgres.limits import SharedGate, limit_name
from flow.store.postgres.shard_leases import open_shards
from flow.store.postgres.store import PostgresStore
from flow.workers.batching import BatchWork
from flow.workers.fingerprint import check_plan
from flow.workers.hand_on import HandOn
from flow.workers.lanes import Lane, all_or_none, packs
from flow.workers.nudge import Nudge
from flow.workers.shared_limiter import SharedLimiter

BUDGET_LOOK_S = 0.05  # near the cap: how often to look whether the calls in flight settled


@dataclass
class WorkOptions:
    """How a worker takes work."""

    claim: int = 0  # requests per claim; 0: the stage's concurrency (times its packs' inputs)
    lease_s: float = 30.0  # a lease lasts this long without a heartbeat
    poll_s: float = 1.0  # with nothing to claim but leases held by others: look again after
    wait_for_work: bool = False  # with nothing left at all: wait for more, not end


def check_shape(config: PipelineConfig, options: RunOptions) -> None:
    """A `ConfigError` for what a shared store does not run (yet)."""
    if options.detach and len(config.chain) > 1 and any(
            stage.executor == "batch" for stage in config.chain):
        raise ConfigError(f"{config.file}: --detach: on a PostgreSQL store a chain holding a "
                          "batch stage runs to its end (its later stages wait on the "
                          "batches); run it without --detach")


class Worker:
    """One worker process; `await Worker(...).execute()` returns its `RunSummary`."""

    def __init__(self, config: PipelineConfig, options: RunOptions, work: WorkOptions,
                 progress: RunProgress | None = None) -> None:
        check_shape(config, options)
        self.config = config
        self.options = options
        self.work = work
        self.progress = progress or RunProgress(simulated=options.simulate)
        self._breaker = Breaker(config.run_keys.stop_after_failures)
        self.stages = [Stage(config, index, self.progress, self._breaker)
                       for index in range(len(config.chain))]
        for stage, after in zip(self.stages, self.stages[1:]):
            stage.next = after
        for stage in self.stages:
            stage.in_store = True  # items wait in the store, found by request key
        self._names = [stage.name for stage in self.stages]
        self._lanes = [Lane(stage) for stage in self.stages]
        keys = config.run_keys
        self._origin = endpoint_origin(options.base_url or keys.base_url, options.simulate,
                                       f"{config.file}: ", keys.endpoint_id)
        self._stop = asyncio.Event()
        self._budget = Budget(options.limit, keys.max_cost_usd)
        self._settled = asyncio.Event()
        self._nudge = Nudge()
        # for each stage: the nudge count when nothing was found stranded before it
        self._clean_at: dict[int, int] = {}
        self._ending = asyncio.Lock()
        self._hand_on: HandOn | None = None
        self._batches: dict[int, BatchWork] = {}  # the batch stages, by their place
        self.rejected = 0

    def request_stop(self) -> None:
        """Send nothing new; finish the requests in flight."""
        self.progress.stopping = self.progress.stopping or "draining"
        self._halt()

    def _halt(self) -> None:
        self._stop.set()
        self._nudge()  # a lane waiting for work ends its wait

    async def execute(self) -> RunSummary:
        """Work until no request is left, or a stop."""
        keys = self.config.run_keys
        api_key = self.options.api_key or keys.api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ConfigError(f"{self.config.file}: no API key: set OPENAI_API_KEY or "
                              "call.api_key")
        check_api_key(api_key, f"{self.config.file}: call.api_key or OPENAI_API_KEY")
        url = store_url(self.config.store)
        # a session paused inside a transaction loses its row locks when it loses its leases
        store = await PostgresStore.open(url, idle_s=min(IDLE_IN_TRANSACTION_S,
                                                         self.work.lease_s))
        store.worker_session = True
        state, message = "finished", None
        fatal: FatalCallError | None = None
        try:
            await check_plan(store, str(self.config.file), self.stages, self._origin)
            base_url = self.options.base_url or keys.base_url
            await store.start_run(self.config.file, self._origin, endpoint_url(base_url))
            context = RunContext(self.config, self.options, store, self._origin, self.progress,
                                 self._budget, self._breaker, self._stop, self._settled,
                                 self._stop_if_tripped)
            limiters: dict[str, SharedLimiter] = {}
            for stage in self.stages:  # stages on one model share its limit
                model = stage.config.model
                if model not in limiters:
                    rpm, tpm = self.config.limits_of(model)
                    gate = SharedGate(store._query, limit_name(self._origin, api_key, model),
                                      rpm, tpm)
                    limiters[model] = SharedLimiter(gate, rpm, tpm, stage.reserve)
            counters: list[ExecutorCounters] = []  # each executor's, as it is made
            senders = [StageSender(stage.config, base_url, api_key,
                                   limiters[stage.config.model], self._stop, counters)
                       for stage in self.stages]
            for stage, sender in zip(self.stages, senders):
                stage.attach(context)
                stage.send_reasks_with(sender.reask)
            hand_on = self._hand_on = HandOn(self.stages, store, self._origin, self._nudge)
            hand_on.start()
            heart = asyncio.create_task(self._beat(store))
            try:
                await hand_on.find_stranded()  # left by a worker killed before handing on
                store_tag = await store.store_id()
                runs = []
                for index, (sender, lane) in enumerate(zip(senders, self._lanes)):
                    if packs(lane.stage):
                        runs.append(sender.packing().execute(self._claimed(store, lane),
                                                             self._deliver(store, lane)))
                        continue
                    if lane.stage.config.executor != "batch":
                        runs.append(sender.online().execute(
                            calls_of(self._claimed(store, lane)), self._deliver(store, lane)))
                        continue
                    # shards cut from the queue, beside the other stages' lanes
                    batches = self._batches[index] = BatchWork(
                        lane.stage, store, sender.client(), sender.online(), self._origin,
                        store_tag, self.work.lease_s, self.work.poll_s, self._stop, self._budget,
                        self.progress, self._names[0], self.options.detach,
                        self.work.wait_for_work, self._before(store, index) if index else None)
                    counters.append(batches.counters)
                    runs.append(self._drive(batches))
                await all_or_none(runs)
                await hand_on.close()
                if hand_on.failure is not None:
                    raise hand_on.failure
            except FatalCallError as e:
                fatal = e
            finally:
                heart.cancel()
                await asyncio.gather(heart, return_exceptions=True)
                await hand_on.cancel()
                with contextlib.suppress(StoreError):  # a failed store says so already
                    await store.queue.release([token for lane in self._lanes
                                               for token in lane.leases.values()])
                for limiter in limiters.values():
                    await limiter.close()
                for sender in senders:
                    await sender.close()
                self.progress.observe(counters, next(iter(limiters.values())).stats())
            self.rejected = store.rejected
            if fatal is None and self._breaker.tripped is not None:
                fatal = FatalCallError(self._breaker.tripped)
            if fatal is not None:
                state, message = "stopped", str(fatal)
            elif self._budget.reached is not None:
                state, message = "stopped", self._budget.reached
            elif self._stop.is_set():
                state, message = "interrupted", "stopped on request: leases given back"
            elif any(batches.detached for batches in self._batches.values()):
                state, message = "detached", DETACHED
        except BaseException as e:
            state, message = "stopped", f"{type(e).__name__}: {e}"
            raise
        finally:
            with contextlib.suppress(Exception):
                await store.finish_run(state, message, self.progress.counts(), self._names)
            await store.close()
        if fatal is not None:
            raise fatal
        return RunSummary(state, self.progress, store.run_id, str(url), message)

    async def _drive(self, batches: BatchWork) -> None:
        """Run a batch stage; then the stages waiting for it to end look again at once."""
        try:
            await batches.execute()
        finally:
            self._nudge()

    async def _claimed(self, store: PostgresStore, lane: Lane) -> AsyncIterator[Call | None]:
        """The requests of `lane`'s stage this worker leases, batch after batch, until none
        is left at any stage; a `FLUSH` after each batch when packing (what is gathered
        goes, not waiting for more)."""
        stage = lane.stage
        packing = packs(stage)
        size = self.work.claim or stage.config.concurrency * (
            stage.config.inputs_per_request if packing else 1)
        while not self._stop.is_set():
            seen = self._nudge.count
            if self._budget.cap_usd is not None:
                # every worker's spend counts: what the others paid is in the store
                spent = await store.spent_usd(self._origin)
                self._budget.spent_before_usd = spent - self.progress.cost_usd
            claimed = await store.queue.claim(self._origin, [stage.name], size,
                                              self.work.lease_s, list(lane.leases.values()))
            if not claimed:
                # a paused worker whose session outlived its lease holds its requests' rows
                await store.queue.end_stuck(self._origin, [stage.name], self.work.lease_s)
                if await self._finished(store):
                    return
                await self._nudge.after(seen, self.work.poll_s)
                continue
            # the items waiting on each request, looked up once for the whole claim
            for found in await store.shards.waiting_on(stage.name, self._origin,
                                                       [c.key for c in claimed],
                                                       self._names[0]):
                lane.waiting.setdefault(found[2], []).append(found)
            for index, item in enumerate(claimed):
                call = Call(item.key, json.loads(item.request_json), item.request_json)
                while (verdict := self._may_send(lane, call)) is Verdict.WAIT:
                    if packing:
                        # the calls gathered into a pack are counted in flight: they must
                        # go, or the budget waits for calls that are never sent
                        yield FLUSH
                    await asyncio.sleep(BUDGET_LOOK_S)
                if verdict is not Verdict.GO:
                    await store.queue.release([c.token for c in claimed[index:]])
                    for unsent in claimed[index:]:
                        lane.waiting.pop(unsent.key, None)
                    return
                lane.leases[item.key] = item.token
                yield call
            if packing:
                yield FLUSH

    async def _finished(self, store: PostgresStore) -> bool:
        """Whether this worker is done: no request free or leased at any stage, none of its
        own in flight or being handed on, and no item left behind by a worker killed
        before it handed it on (those found are handed on now)."""
        return await self._quiet(store, len(self.stages)) and not self.work.wait_for_work

    def _before(self, store: PostgresStore, index: int) -> Callable[[], Awaitable[bool]]:
        """Whether the stages before `index` can hand nothing more on."""
        async def before() -> bool:
            return await self._quiet(store, index)
        return before

    async def _quiet(self, store: PostgresStore, index: int) -> bool:
        """Whether the stages before `index` are done: no request of theirs free or leased,
        no batch of theirs uncollected, none of this worker's in flight or being handed on,
        and no item left behind by a worker killed before it handed it on (those found are
        handed on now)."""
        hand_on = self._hand_on
        assert hand_on is not None
        if hand_on.failure is not None:
            raise hand_on.failure
        names = self._names[:index]
        # one look at a time: another stage that looks while items found are being handed
        # on must see this worker busy, not end
        async with self._ending:
            if not self._idle(index):
                return False
            free, leased = await store.queue.left(self._origin, names)
            if free or leased or not self._idle(index):
                return False
            if any(place < index for place in self._batches) and await open_shards(
                    store, self._origin, names):
                return False
            if len(self.stages) > 1 and self._clean_at.get(index) != self._nudge.count:
                count = self._nudge.count
                if await hand_on.find_stranded():
                    return False
                self._clean_at[index] = count
            return True

    def _idle(self, index: int) -> bool:
        """Nothing this worker handed on is being planned, and it holds no request of the
        stages before `index`."""
        assert self._hand_on is not None
        return self._hand_on.idle and not any(lane.leases for lane in self._lanes[:index]) and (
            not any(batches.holding for place, batches in self._batches.items()
                    if place < index))

    def _may_send(self, lane: Lane, call: Call) -> Verdict:
        """Whether `call` may go now (`GO` counts it as sent), must wait for the calls in
        flight to settle (spend they may bring to the cap), or not go at all (`STOP`:
        stopping, over budget, --limit)."""
        if self._stop.is_set():
            return Verdict.STOP
        estimate = 0.0 if self._budget.cap_usd is None else estimate_call_usd(
            lane.stage.price, call.request_json, lane.stage.reserve.cap)
        verdict = self._budget.take(self.progress.cost_usd, estimate)
        if verdict is Verdict.STOP:
            self.progress.stopping = ("budget reached" if self._budget.reached
                                      else f"--limit {self._budget.limit}")
            self._halt()
        return verdict

    def _deliver(self, store: PostgresStore, lane: Lane):  # type: ignore[no-untyped-def]
        async def deliver(result: CallResult) -> None:
            self._budget.settle()
            self._settled.set()  # a re-ask waiting for the budget looks again
            key = result.call.key
            token, found = lane.leases[key], lane.waiting.pop(key, [])
            try:
                if result.unsent:
                    await store.queue.release([token])
                else:
                    await lane.stage.delivery.deliver_stored(result, lease=token, found=found)
            finally:
                # held until committed and handed on: a claim meanwhile must not take it as
                # lost, and the worker does not end before its items went on
                del lane.leases[key]
                self._nudge()
        return deliver

    async def _beat(self, store: PostgresStore) -> None:
        """Keep this worker's leases while it works; a beat that fails is tried again at
        the next (a store gone for good ends the worker's other statements)."""
        while True:
            await asyncio.sleep(self.work.lease_s / 3)
            with contextlib.suppress(StoreError):
                await store.queue.heartbeat(self.work.lease_s)

    def _stop_if_tripped(self) -> None:
        if self._breaker.tripped is not None and not self._stop.is_set():
            self.progress.stopping = "items keep failing the same way"
            self._halt()
