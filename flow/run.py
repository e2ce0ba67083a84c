"""One run of a pipeline, conducted: its stages started, fed and stopped.

Each stage (`flow.stage`) plans its items (`flow.plan`) and feeds the calls it needs to its
own executor (`flow.execute`), one call per distinct request; each result is post-processed
for every item waiting on it and committed with the paid reply before the executor's worker
takes its next call, and the items it finishes go on to the next stage. Stages on one model
share one rate limiter (providers limit per model); stages on different models run side by
side, each at its own limit.

Stopping: `request_stop()` once stops feeding new calls and lets calls in flight finish for
up to `drain_s`; twice, or on a fatal error, stops at once. Either way every result already
received is committed before `execute()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from flow.budget import Breaker, Budget
from flow.config import PipelineConfig, check_api_key
from flow.config.store_url import sqlite_path
from flow.endpoints import endpoint_origin, endpoint_url, same_origin
from flow.errors import ConfigError, FatalCallError
from flow.execute import Deliver, Executor, ExecutorCounters, calls_of
from flow.execute.sending import StageSender
from flow.limiter import RateLimiter
from flow.load import count_rows
from flow.plan import RunOptions
from flow.prices import batch_price, estimate_call_usd
from flow.progress import RunProgress, RunSummary
from flow.records import Call
from flow.stage import RunContext, Stage
from flow.store import Store, check_error_class, check_owner, open_store

if TYPE_CHECKING:
    from flow.execute.batch import BatchExecutor

__all__ = ["Run", "RunOptions", "run_pipeline"]

TICK_S = 0.25
STOPPED_BY = {
    "draining": "stopped on request (Ctrl-C or SIGTERM): the requests in flight were finished "
                "and committed, nothing new was sent",
    "stopping": "stopped at once on a second request (Ctrl-C or SIGTERM): everything received "
                "was committed"}
DETACHED = ("the batches submitted go on at the provider: run the same command again to "
            "collect them (nothing is created twice)")
BUDGET_BATCH = ("stopped before creating a batch that could take spend past max_cost_usd "
                "(each batch is counted at its worst case, at batch prices)")


ProgressHook = Callable[[RunProgress], None]


class Run:
    """A run of one pipeline; `await Run(...).execute()` returns its `RunSummary`."""

    def __init__(self, config: PipelineConfig, options: RunOptions,
                 on_progress: ProgressHook | None = None) -> None:
        self.config = config
        self.options = options
        self.progress = RunProgress(simulated=options.simulate)
        self._on_progress = on_progress
        keys = config.run_keys
        self._breaker = Breaker(keys.stop_after_failures)
        self.stages = [Stage(config, index, self.progress, self._breaker)
                       for index in range(len(config.chain))]
        for stage, after in zip(self.stages, self.stages[1:]):
            stage.next = after
        names = [stage.name for stage in self.stages]
        if options.stage is not None and options.stage not in names:
            raise ConfigError(f"--stage {options.stage}: {config.file.name} has no such stage; "
                              f"its stages are {', '.join(names)}")
        self._origin = endpoint_origin(options.base_url or keys.base_url, options.simulate,
                                       f"{config.file}: ", keys.endpoint_id)
        for index, stage in enumerate(self.stages):
            if keys.max_cost_usd is not None and stage.price is None:
                key = "call" if config.stages is None else f"stages[{index}]"
                raise ConfigError(
                    f"{config.file}: {key}.max_cost_usd: flow does not know the price of "
                    f"model '{stage.config.model}', so it cannot count spend; add {key}.price: "
                    "{input_per_1m: ..., output_per_1m: ...} (US dollars per million tokens)")
        self._base_url = options.base_url or keys.base_url
        self._stop_feeding = asyncio.Event()
        self._abort = asyncio.Event()
        self._budget = Budget(options.limit, keys.max_cost_usd)
        self._batch_worst_usd = 0.0  # the batches this run created, each at its worst
        self._counters: list[ExecutorCounters] = []  # every executor's, online ones too

    def request_stop(self) -> None:
        """First call: finish what is in flight, start nothing new. Second call: stop now."""
        if not self._stop_feeding.is_set():
            self.progress.stopping = "draining"
            self._stop_feeding.set()
        else:
            self.progress.stopping = "stopping"
            self._abort.set()

    async def execute(self) -> RunSummary:
        """Run the pipeline to its end, or until stopped; commit every result received."""
        keys = self.config.run_keys
        self.progress.total = count_rows(self.config.load)
        api_key = self.options.api_key or keys.api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ConfigError(
                f"{self.config.file}: no API key: set OPENAI_API_KEY or call.api_key, "
                "or add --simulate to run against the built-in simulator")
        check_api_key(api_key, f"{self.config.file}: call.api_key or OPENAI_API_KEY")
        path = sqlite_path(self.config.store, "this run")
        store = await open_store(path, self.config.store_busy_timeout_s)
        state, message = "finished", None
        fatal: FatalCallError | None = None
        names = [stage.name for stage in self.stages]
        try:
            check_owner(await store.last_pipeline(), path, self.config.file,
                        self.options.take_over_store)
            if self.options.error_class is not None:
                check_error_class(self.options.error_class, await self._failed_classes(store))
            self._origin = same_origin(self._origin, await store.origins())
            await store.start_run(self.config.file, self._origin, endpoint_url(self._base_url))
            if keys.max_cost_usd is not None:  # what was spent counts only toward a cap
                self._budget.spent_before_usd = await store.spent_usd(self._origin)
                self.progress.spent_before_usd = self._budget.spent_before_usd
            self.progress.cap_usd = keys.max_cost_usd
            context = RunContext(self.config, self.options, store, self._origin, self.progress,
                                 self._budget, self._breaker, self._stop_feeding,
                                 asyncio.Event(), self._stop_if_tripped)
            limiters = self._limiters()
            executors: list[Executor] = []
            batched: list[BatchExecutor] = []
            # each stage's client and online executors, made when first needed (a run
            # with nothing to send never loads the SDK); their calls are counted as made
            senders = [StageSender(stage.config, self._base_url, api_key,
                                   limiters[stage.config.model], self._stop_feeding,
                                   self._counters) for stage in self.stages]
            store_tag = await store.store_id()
            for stage, sender in zip(self.stages, senders):
                stage.attach(context)
                # the stage's re-asks go out online (a batch stage's too), and a batch
                # stage's expired lines through `now`
                stage.send_reasks_with(sender.reask)
                if stage.config.executor == "batch":
                    batched.append(self._batch_executor(stage, sender, store, store_tag))
                    executors.append(batched[-1])
                    self._counters.append(batched[-1].counters)
                else:
                    executors.append(sender)
            try:
                await self._conduct(executors, senders, list(limiters.values()))
            except FatalCallError as e:
                fatal = e
            finally:
                for sender in senders:
                    await sender.close()
            if fatal is None and self._breaker.tripped is not None:
                fatal = FatalCallError(self._breaker.tripped)
            if fatal is not None:
                state, message = "stopped", str(fatal)
            elif self._budget.reached is not None:
                state, message = "stopped", self._budget.reached
            elif any(e.stopped_by_budget for e in batched):
                state, message = "stopped", BUDGET_BATCH
            elif self._stop_feeding.is_set():
                state, message = "interrupted", STOPPED_BY.get(self.progress.stopping or "")
                if batched:
                    message = f"{message}; {DETACHED}"
            elif self.options.detach and self.progress.batches is not None and (
                    self.progress.batches.batches_running):
                state, message = "detached", DETACHED
        except BaseException as e:
            state, message = "stopped", f"{type(e).__name__}: {e}"
            raise
        finally:
            with contextlib.suppress(Exception):
                await store.finish_run(state, message, self.progress.counts(), names)
            await store.close()
        if fatal is not None:
            raise fatal
        return RunSummary(state, self.progress, store.run_id, str(self.config.store), message)

    async def _failed_classes(self, store: Store) -> dict[str, int]:
        """Failed items by error class at the stages `--retry-failed` retries."""
        found: dict[str, int] = {}
        for stage in self.stages:
            if self.options.stage in (None, stage.name):
                for name, count in (await store.failed_classes(stage.name)).items():
                    found[name] = found.get(name, 0) + count
        return found

    def _batch_executor(self, stage: Stage, sender: StageSender, store: Store,
                        store_tag: str) -> BatchExecutor:
        """The Batch API executor of `stage`: its shards in the store, its budget checked
        before each create at batch prices, and the sender's `now` for lines `on_expired`
        sends so."""
        from flow.execute.batch import BatchExecutor, BatchRun
        from flow.execute.batch_shard import URLS

        online = sender.now()
        price = batch_price(stage.price)
        reserve = stage.reserve

        def worst_cost(request_json: str) -> float:
            return estimate_call_usd(price, request_json, reserve.cap)

        async def finish_online(calls: list[Call], deliver: Deliver) -> None:
            async def each() -> AsyncIterator[Call]:
                for call in calls:
                    yield call
            await online.execute(each(), deliver)

        def worst_tokens(request_json: str) -> int:
            return len(request_json) // 4 + reserve.cap  # no tokenizer: about 4 chars a token

        run = BatchRun(store.shards, stage.name, self._origin, store_tag, store.run_id,
                       self._may_spend, worst_cost, worst_tokens, URLS[stage.config.endpoint])
        return BatchExecutor(stage.config, sender.client(), run, self._stop_feeding,
                             self.options.detach, finish_online)

    def _may_spend(self, worst_usd: float) -> bool:
        """Whether a batch that may cost `worst_usd` fits the budget, with every batch this
        run created counted at its worst; counted if so."""
        cap = self._budget.cap_usd
        if cap is None:
            return True
        spent = self._budget.spent_before_usd + self.progress.cost_usd + self._batch_worst_usd
        if spent + worst_usd > cap:
            return False
        self._batch_worst_usd += worst_usd
        return True

    def _limiters(self) -> dict[str, RateLimiter]:
        """One limiter per model (the endpoint and key are the run's): the lowest limits its
        stages configure, the completion reserve of its first stage."""
        limiters: dict[str, RateLimiter] = {}
        for stage in self.stages:
            model = stage.config.model
            if model in limiters:
                continue
            limiters[model] = RateLimiter(*self.config.limits_of(model), reserve=stage.reserve)
        return limiters

    async def _conduct(self, executors: list[Executor], senders: list[StageSender],
                       limiters: list[RateLimiter]) -> None:
        """Feed every stage until the input ends or a stop; drain on a stop request."""
        ticker = asyncio.create_task(self._tick(limiters))

        async def feed(stage: Stage, executor: Executor, sender: StageSender) -> None:
            # a batch stage's re-asks wait for the online limiter beside its batches: a stop
            # ends those waits at once, as it does an online stage's
            waker = None if executor is sender else asyncio.create_task(
                sender.online().wake_on_stop())
            try:
                if executor is sender:  # FLUSHes go to a packing executor
                    await sender.execute(stage.calls(), stage.deliver)
                else:
                    await executor.execute(calls_of(stage.calls()), stage.deliver)
                await stage.delivery.drain()
            finally:
                if waker is not None:
                    waker.cancel()
                await stage.delivery.abandon()
                if stage.inbox is not None:
                    await stage.inbox.close()  # stopped early: the stage before never waits
                if stage.next is not None and stage.next.inbox is not None:
                    await stage.next.inbox.end()

        work: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(
            *(feed(stage, executor, sender) for stage, executor, sender
              in zip(self.stages, executors, senders))))
        stop: asyncio.Future[Any] = asyncio.create_task(self._stop_feeding.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                abort: asyncio.Future[Any] = asyncio.create_task(self._abort.wait())
                await asyncio.wait({work, abort}, timeout=self.config.run_keys.drain_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                abort.cancel()
            if work.done():
                work.result()
        finally:
            for task in (work, stop, ticker):
                task.cancel()
            await asyncio.gather(work, stop, ticker, return_exceptions=True)
            self.progress.observe(self._counters, limiters[0].stats())

    def _stop_if_tripped(self) -> None:
        """Items keep failing the same way: send nothing more; what is in flight finishes."""
        if self._breaker.tripped is not None and not self._stop_feeding.is_set():
            self.progress.stopping = "items keep failing the same way"
            self._stop_feeding.set()

    async def _tick(self, limiters: list[RateLimiter]) -> None:
        while True:
            self.progress.observe(self._counters, limiters[0].stats())
            if self._on_progress is not None:
                self._on_progress(self.progress)
            await asyncio.sleep(TICK_S)


async def run_pipeline(config: PipelineConfig, options: RunOptions,
                       on_progress: ProgressHook | None = None) -> RunSummary:
    """Run `config` once; see `Run`."""
    return await Run(config, options, on_progress).execute()
