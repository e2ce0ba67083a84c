"""`flow plan`: the input read, each item recorded, and each request it needs queued once.

Planning is a run whose executor queues instead of sending (`QueueExecutor`): the same
planning as `flow run` (rendering, keys, what the store holds), so items done before are
not queued again, and stored replies serve edited post steps here, without a call. Safe to
run again: an item or request already recorded is not recorded twice.

A chain is planned stage after stage as a run hands items on: an item done at one stage (in
an earlier plan, by workers) is planned at the next, and its request queued there, so a plan
run again queues what a worker killed before it handed an item on never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable
from dataclasses import dataclass

from flow.budget import Breaker, Budget
from flow.config import PipelineConfig
from flow.config.store_url import store_url
from flow.endpoints import endpoint_origin, same_origin
from flow.execute import Deliver, ExecutorCounters, calls_of
from flow.load import count_rows
from flow.plan import RunOptions
from flow.progress import RunProgress
from flow.records import Call
from flow.stage import RunContext, Stage
from flow.store.postgres.queue import WorkQueue
from flow.store.postgres.store import PostgresStore
from flow.workers.fingerprint import record_plan
from flow.workers.worker import check_shape

QUEUE_CHUNK = 1000


@dataclass
class PlanSummary:
    """What planning did."""

    progress: RunProgress
    queued: int  # requests newly waiting for a worker
    run_id: int
    store: str


class QueueExecutor:
    """Queues each call in the store for workers to claim; delivers nothing itself."""

    def __init__(self, queue: WorkQueue, stage: str, origin: str) -> None:
        self._queue = queue
        self._stage = stage
        self._origin = origin
        self.counters = ExecutorCounters()
        self.queued = 0

    async def execute(self, calls: AsyncIterable[Call], deliver: Deliver) -> None:
        """Queue every call, a chunk at a time."""
        chunk: list[tuple[str, str]] = []
        async for call in calls:
            chunk.append((call.key, call.request_json))
            if len(chunk) >= QUEUE_CHUNK:
                self.queued += await self._queue.enqueue(self._stage, self._origin, chunk)
                chunk = []
        self.queued += await self._queue.enqueue(self._stage, self._origin, chunk)


async def plan_pipeline(config: PipelineConfig, options: RunOptions) -> PlanSummary:
    """Record the items of `config` in its PostgreSQL store and queue their requests."""
    check_shape(config, options)
    progress = RunProgress(simulated=options.simulate)
    breaker = Breaker(config.run_keys.stop_after_failures)
    stages = [Stage(config, index, progress, breaker) for index in range(len(config.chain))]
    for stage, after in zip(stages, stages[1:]):
        stage.next = after
    for stage in stages:
        stage.in_store = True  # queued, not sent: no item waits in memory
    keys = config.run_keys
    origin = endpoint_origin(options.base_url or keys.base_url, options.simulate,
                             f"{config.file}: ", keys.endpoint_id)
    progress.total = count_rows(config.load)
    url = store_url(config.store)
    store = await PostgresStore.open(url, exclusive=True)
    state, message = "planned", None
    executors = [QueueExecutor(store.queue, stage.name, origin) for stage in stages]
    try:
        origin = same_origin(origin, await store.origins())
        await store.start_run(config.file, origin, "plan")
        context = RunContext(config, options, store, origin, progress,
                             Budget(options.limit), breaker, asyncio.Event(), asyncio.Event(),
                             lambda: None)
        for stage in stages:
            stage.attach(context)
        await record_plan(store, stages, origin)
        for outcome in await asyncio.gather(*(_queue(stage, executor) for stage, executor
                                              in zip(stages, executors)),
                                            return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        await store.analyze()
    except BaseException as e:
        state, message = "stopped", f"{type(e).__name__}: {e}"
        raise
    finally:
        with contextlib.suppress(Exception):
            await store.finish_run(state, message, progress.counts(),
                                   [stage.name for stage in stages])
        await store.close()
    return PlanSummary(progress, sum(e.queued for e in executors), store.run_id, str(url))


async def _queue(stage: Stage, executor: QueueExecutor) -> None:
    """Queue a stage's requests; once it has planned every item, the next stage has them all."""
    try:
        await executor.execute(calls_of(stage.calls()), stage.deliver)
    finally:
        if stage.inbox is not None:
            await stage.inbox.close()  # stopped early: the stage before never waits
        if stage.next is not None and stage.next.inbox is not None:
            await stage.next.inbox.end()
