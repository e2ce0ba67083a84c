"""`flow worker`: one process that claims queued requests, sends them and commits results.

It needs the store's URL, the API key and the pipeline file (for its post steps and limits),
not the input: the requests are in the store. It takes requests in batches under leases,
beats its heart while it works, and sends through the same `OnlineExecutor` as a run, its
pace behind the limit all workers share; an embeddings stage's through the `PackingExecutor`
(each queued request is one item's input: a claim's inputs go `inputs_per_request` to a
request, each item's result committed under its own lease). Each result is committed for
every item waiting on its request, fenced by the lease: a result whose lease another worker
took is kept as a paid attempt, nothing more. It ends when no request is left, or on a stop; leases of
requests it never sent are given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from flow.budget import Breaker, Budget, Verdict
from flow.config import PipelineConfig, check_api_key
from flow.config.store_url import store_url
from flow.endpoints import endpoint_origin
from flow.errors import ConfigError, FatalCallError, StoreError
from flow.execute.client import make_client
from flow.execute.online import OnlineExecutor
from flow.execute.packing import FLUSH, PackingExecutor, packed_config
from flow.plan import RunOptions
from flow.prices import estimate_call_usd
from flow.progress import RunProgress, RunSummary
from flow.records import Call, CallResult
from flow.stage import RunContext, Stage
from flow.store.postgres.connect import IDLE_IN_TRANSACTION_S
from flow.store.postgres.limits import SharedGate, limit_name
from flow.store.postgres.store import PostgresStore
from flow.store.shards import Waiting
from flow.workers.fingerprint import check_plan
from flow.workers.shared_limiter import SharedLimiter

BUDGET_LOOK_S = 0.05  # near the cap: how often to look whether the calls in flight settled


@dataclass
class WorkOptions:
    """How a worker takes work."""

    claim: int = 0  # requests per claim; 0: the stage's concurrency (times its packs' inputs)
    lease_s: float = 30.0  # a lease lasts this long without a heartbeat
    poll_s: float = 1.0  # with nothing to claim but leases held by others: look again after
    wait_for_work: bool = False  # with nothing left at all: wait for more, not end


def check_shape(config: PipelineConfig) -> None:
    """A `ConfigError` for what a shared store does not run (yet)."""
    if len(config.chain) > 1:
        raise ConfigError(f"{config.file}: stages: a PostgreSQL store runs a pipeline of one "
                          "`call:` stage for now; run a chain with a SQLite `store:`")
    if config.chain[0].executor == "batch":
        raise ConfigError(f"{config.file}: executor: batch: the Batch API runs from one "
                          "process; on a PostgreSQL store use executor: online (the default)")


class Worker:
    """One worker process; `await Worker(...).execute()` returns its `RunSummary`."""

    def __init__(self, config: PipelineConfig, options: RunOptions, work: WorkOptions,
                 progress: RunProgress | None = None) -> None:
        check_shape(config)
        self.config = config
        self.options = options
        self.work = work
        self.progress = progress or RunProgress(simulated=options.simulate)
        self._breaker = Breaker(config.run_keys.stop_after_failures)
        self.stage = Stage(config, 0, self.progress, self._breaker)
        keys = config.run_keys
        self._origin = endpoint_origin(options.base_url or keys.base_url, options.simulate,
                                       f"{config.file}: ", keys.endpoint_id)
        self._stop = asyncio.Event()
        self._budget = Budget(options.limit, keys.max_cost_usd)
        self._leases: dict[str, int] = {}
        self._settled = asyncio.Event()
        self._waiting: dict[str, list[Waiting]] = {}
        self.rejected = 0

    def request_stop(self) -> None:
        """Send nothing new; finish the requests in flight."""
        self.progress.stopping = self.progress.stopping or "draining"
        self._stop.set()

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
            await check_plan(store, str(self.config.file), [self.stage], self._origin)
            client = make_client(self.stage.config, self.options.base_url or keys.base_url,
                                 api_key)
            await store.start_run(self.config.file, self._origin, str(client.base_url))
            context = RunContext(self.config, self.options, store, self._origin, self.progress,
                                 self._budget, self._breaker, self._stop, self._settled,
                                 self._stop_if_tripped)
            self.stage.attach(context)
            config = self.stage.config
            gate = SharedGate(store._query, limit_name(self._origin, api_key, config.model),
                              config.rpm, config.tpm)
            limiter = SharedLimiter(gate, config.rpm, config.tpm, self.stage.reserve)
            online = OnlineExecutor(packed_config(config) if self._packs else config, client,
                                    limiter, [api_key, *config.secrets()], self._stop)
            self.stage.send_reasks_with(online.call)
            heart = asyncio.create_task(self._beat(store))
            try:
                if self._packs:
                    await PackingExecutor(config, online).execute(self._claimed(store),
                                                                  self._deliver(store))
                else:
                    await online.execute(_calls(self._claimed(store)), self._deliver(store))
            except FatalCallError as e:
                fatal = e
            finally:
                heart.cancel()
                await asyncio.gather(heart, return_exceptions=True)
                with contextlib.suppress(StoreError):  # a failed store says so already
                    await store.queue.release(list(self._leases.values()))
                await limiter.close()
                await client.close()
                self.progress.observe([online.counters], limiter.stats())
            self.rejected = store.rejected
            if fatal is None and self._breaker.tripped is not None:
                fatal = FatalCallError(self._breaker.tripped)
            if fatal is not None:
                state, message = "stopped", str(fatal)
            elif self._budget.reached is not None:
                state, message = "stopped", self._budget.reached
            elif self._stop.is_set():
                state, message = "interrupted", "stopped on request: leases given back"
        except BaseException as e:
            state, message = "stopped", f"{type(e).__name__}: {e}"
            raise
        finally:
            with contextlib.suppress(Exception):
                await store.finish_run(state, message, self.progress.counts())
            await store.close()
        if fatal is not None:
            raise fatal
        return RunSummary(state, self.progress, store.run_id, str(url), message)

    @property
    def _packs(self) -> bool:
        """Whether the stage's requests are packed, many to a request (embeddings)."""
        return self.stage.config.endpoint == "embeddings"

    async def _claimed(self, store: PostgresStore) -> AsyncIterator[Call | None]:
        """The requests this worker leases, batch after batch, until none is left; a
        `FLUSH` after each batch when packing (what is gathered goes, not waiting for more)."""
        stage = self.stage
        size = self.work.claim or stage.config.concurrency * (
            stage.config.inputs_per_request if self._packs else 1)
        while not self._stop.is_set():
            if self._budget.cap_usd is not None:
                # every worker's spend counts: what the others paid is in the store
                spent = await store.spent_usd(self._origin)
                self._budget.spent_before_usd = spent - self.progress.cost_usd
            claimed = await store.queue.claim(self._origin, [stage.name], size,
                                              self.work.lease_s, list(self._leases.values()))
            if not claimed:
                free, leased = await store.queue.left(self._origin, [stage.name])
                if not free and not leased and not self.work.wait_for_work:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.work.poll_s)
                continue
            # the items waiting on each request, looked up once for the whole claim
            for found in await store.shards.waiting_on(stage.name, self._origin,
                                                       [c.key for c in claimed], stage.name):
                self._waiting.setdefault(found[2], []).append(found)
            for index, item in enumerate(claimed):
                call = Call(item.key, json.loads(item.request_json), item.request_json)
                if not await self._may_send(call):
                    await store.queue.release([c.token for c in claimed[index:]])
                    for unsent in claimed[index:]:
                        self._waiting.pop(unsent.key, None)
                    return
                self._leases[item.key] = item.token
                yield call
            if self._packs:
                yield FLUSH

    async def _may_send(self, call: Call) -> bool:
        """Count `call` as sent, or (stopping, over budget, --limit) not. Spend that the
        calls in flight may bring to the cap is waited out first."""
        estimate = 0.0 if self._budget.cap_usd is None else estimate_call_usd(
            self.stage.price, call.request_json, self.stage.reserve.cap)
        while not self._stop.is_set():
            verdict = self._budget.take(self.progress.cost_usd, estimate)
            if verdict is Verdict.GO:
                return True
            if verdict is Verdict.STOP:
                self.progress.stopping = ("budget reached" if self._budget.reached
                                          else f"--limit {self._budget.limit}")
                self._stop.set()
                break
            await asyncio.sleep(BUDGET_LOOK_S)
        return False

    def _deliver(self, store: PostgresStore):  # type: ignore[no-untyped-def]
        async def deliver(result: CallResult) -> None:
            self._budget.settle()
            self._settled.set()  # a re-ask waiting for the budget looks again
            key = result.call.key
            token, found = self._leases[key], self._waiting.pop(key, [])
            try:
                if result.unsent:
                    await store.queue.release([token])
                else:
                    await self.stage.delivery.deliver_stored(result, lease=token, found=found)
            finally:
                # held until committed: a claim meanwhile must not take it as lost
                del self._leases[key]
        return deliver

    async def _beat(self, store: PostgresStore) -> None:
        """Keep this worker's leases while it works."""
        while True:
            await asyncio.sleep(self.work.lease_s / 3)
            await store.queue.heartbeat(self.work.lease_s)

    def _stop_if_tripped(self) -> None:
        if self._breaker.tripped is not None and not self._stop.is_set():
            self.progress.stopping = "items keep failing the same way"
            self._stop.set()


async def _calls(claimed: AsyncIterable[Call | None]) -> AsyncIterator[Call]:
    """The calls of a source that yields no `FLUSH` (it does only when packing)."""
    async for call in claimed:
        if call is not None:
            yield call
