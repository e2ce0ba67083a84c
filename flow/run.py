"""One run of a pipeline, conducted: source, plan, execute, post, store, progress, stop.

The producer reads rows in batches, plans each batch (`flow.plan`) and feeds the calls it
needs to the executor (`flow.execute`), one call per distinct request: items that render a
request already in flight wait for its reply instead of paying for it again. Each result is
post-processed for every item waiting on it and committed together with the paid reply
before the executor's worker takes its next call.

Stopping: `request_stop()` once stops feeding new calls and lets calls in flight finish for
up to `call.drain_s`; twice, or on a fatal error, stops at once. Either way every result
already received is committed before `execute()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from flow.budget import Breaker, Budget, Verdict
from flow.config import PipelineConfig, check_api_key
from flow.endpoints import endpoint_origin, same_origin
from flow.errors import ConfigError, FatalCallError
from flow.execute import Executor
from flow.execute.client import make_client
from flow.execute.online import OnlineExecutor
from flow.limiter import RateLimiter
from flow.load import count_rows, read_rows
from flow.plan import Action, Planned, Planner, batches, decide, prepare
from flow.post import PostProcessor
from flow.prices import Price, estimate_call_usd, price_for
from flow.progress import RunProgress, RunSummary
from flow.records import STAGE, Call, CallResult
from flow.render import RequestBuilder
from flow.settle import Outcomes
from flow.store import Store, check_error_class, check_owner, open_store
from flow.tokens import OutputReserve

TICK_S = 0.25
STOPPED_BY = {
    "draining": "stopped on request (Ctrl-C or SIGTERM): the requests in flight were finished "
                "and committed, nothing new was sent",
    "stopping": "stopped at once on a second request (Ctrl-C or SIGTERM): everything received "
                "was committed"}


@dataclass
class RunOptions:
    """How to run, beyond the pipeline file."""

    simulate: bool = False
    base_url: str | None = None
    api_key: str | None = None
    limit: int | None = None
    retry_failed: bool = False
    error_class: str | None = None
    take_over_store: bool = False
    recall: bool = False  # --retry-failed: buy replies again even for post-step failures


ProgressHook = Callable[[RunProgress], None]


class Run:
    """A run of one pipeline; `await Run(...).execute()` returns its `RunSummary`."""

    def __init__(self, config: PipelineConfig, options: RunOptions,
                 on_progress: ProgressHook | None = None) -> None:
        self.config = config
        self.options = options
        self.progress = RunProgress(simulated=options.simulate)
        self._on_progress = on_progress
        self._builder = RequestBuilder(config.call, f"{config.file}: ", config.step_timeout_s)
        self._post = PostProcessor(config.post, config.file.parent, config.step_timeout_s,
                                   config.call.on_truncated)
        self._price: Price | None = price_for(config.call.model, config.call.price)
        self._origin = endpoint_origin(options.base_url or config.call.base_url,
                                       options.simulate, f"{config.file}: ",
                                       config.call.endpoint_id)
        self._breaker = Breaker(config.call.stop_after_failures)
        self._outcomes = Outcomes(self._post, self._price, self._origin, self.progress,
                                  self._breaker)
        if config.call.max_cost_usd is not None and self._price is None:
            raise ConfigError(
                f"{config.file}: call.max_cost_usd: flow does not know the price of model "
                f"'{config.call.model}', so it cannot count spend; add call.price: "
                "{input_per_1m: ..., output_per_1m: ...} (US dollars per million tokens)")
        self._reserve = OutputReserve(config.call.params, config.call.expected_output_tokens)
        self._base_url = options.base_url or config.call.base_url
        self._stop_feeding = asyncio.Event()
        self._abort = asyncio.Event()
        # request key -> the items waiting for its reply; changed only under `_plan_lock`,
        # so planning never misses a reply committed while it looked up the store
        self._in_flight: dict[str, list[Planned]] = {}
        self._plan_lock = asyncio.Lock()
        self._budget = Budget(options.limit, config.call.max_cost_usd)
        self._settled = asyncio.Event()  # a call sent has its result: the budget may look again

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
        call = self.config.call
        self.progress.total = count_rows(self.config.load)
        api_key = self.options.api_key or call.api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ConfigError(
                f"{self.config.file}: no API key: set OPENAI_API_KEY or call.api_key, "
                "or add --simulate to run against the built-in simulator")
        check_api_key(api_key, f"{self.config.file}: call.api_key or OPENAI_API_KEY")
        store = await open_store(self.config.store, self.config.store_busy_timeout_s)
        state, message = "finished", None
        fatal: FatalCallError | None = None
        try:
            check_owner(await store.last_pipeline(), self.config.store, self.config.file,
                        self.options.take_over_store)
            if self.options.error_class is not None:
                check_error_class(self.options.error_class, await store.failed_classes(STAGE))
            client = make_client(call, self._base_url, api_key)
            self._origin = same_origin(self._origin, await store.origins())
            self._outcomes.origin = self._origin
            await store.start_run(self.config.file, self._origin, str(client.base_url))
            self._budget.spent_before_usd = await store.spent_usd(self._origin)
            self.progress.spent_before_usd = self._budget.spent_before_usd
            self.progress.cap_usd = call.max_cost_usd
            limiter = RateLimiter(call.rpm, call.tpm, reserve=self._reserve)
            executor = OnlineExecutor(call, client, limiter, [api_key, *call.secrets()],
                                      self._stop_feeding)
            try:
                await self._conduct(store, executor, limiter)
            except FatalCallError as e:
                fatal = e
            finally:
                await client.close()
            if fatal is None and self._breaker.tripped is not None:
                fatal = FatalCallError(self._breaker.tripped)
            if fatal is not None:
                state, message = "stopped", str(fatal)
            elif self._budget.reached is not None:
                state, message = "stopped", self._budget.reached
            elif self._stop_feeding.is_set():
                state, message = "interrupted", STOPPED_BY.get(self.progress.stopping or "")
        except BaseException as e:
            state, message = "stopped", f"{type(e).__name__}: {e}"
            raise
        finally:
            with contextlib.suppress(Exception):
                await store.finish_run(state, message, self.progress.counts())
            await store.close()
        if fatal is not None:
            raise fatal
        return RunSummary(state, self.progress, store.run_id, str(self.config.store), message)

    async def _conduct(self, store: Store, executor: Executor,
                       limiter: RateLimiter) -> None:
        """Feed the executor until the input ends or a stop; drain on a stop request."""
        ticker = asyncio.create_task(self._tick(executor, limiter))

        async def deliver(result: CallResult) -> None:
            await self._deliver(store, result)

        work = asyncio.create_task(executor.execute(self._calls(store), deliver))
        stop = asyncio.create_task(self._stop_feeding.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                abort = asyncio.create_task(self._abort.wait())
                await asyncio.wait({work, abort}, timeout=self.config.call.drain_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                abort.cancel()
            if work.done():
                work.result()
        finally:
            for task in (work, stop, ticker):
                task.cancel()
            await asyncio.gather(work, stop, ticker, return_exceptions=True)
            self.progress.observe(executor.counters, limiter.stats())

    async def _calls(self, store: Store) -> AsyncIterator[Call]:
        """The distinct calls the input needs, batch after batch; the input's end forgets
        items whose rows are gone.

        Batch N+1 is rendered while batch N's look-ups run on the store's thread.
        """
        source = self.config.load.path.name
        planner = Planner(store, self._origin, source)
        await store.begin_seen_ids()
        planning: asyncio.Task[list[Call]] | None = None
        try:
            # a last empty step hands out the last batch's calls
            for batch in itertools.chain(batches(read_rows(self.config.load)),
                                         [None]):
                self.progress.rows += len(batch or ())
                prepared = prepare(batch, self._builder, source) if batch else None
                if planning is not None:
                    calls, planning = await planning, None
                    for call in calls:
                        if not await self._may_send(calls, call):
                            return
                        yield call
                if prepared is None:
                    break
                if self._stop_feeding.is_set():
                    return
                planning = asyncio.create_task(self._plan(store, planner, prepared))
        finally:
            if planning is not None:
                planning.cancel()
        # the whole input was read: rows without an id of their own are named, and items
        # whose rows are gone leave the results
        await planner.name_held()
        self.progress.input_read = True
        self.progress.removed = await store.forget_unseen(STAGE)

    async def _plan(self, store: Store, planner: Planner, prepared: list[Planned]) -> list[Call]:
        """Record a batch, decide each item, post what stored replies serve: its new calls."""
        callable_items = await planner.record(prepared)
        counts = planner.take_counts()
        self.progress.failed += counts.failed
        for error_class, error in counts.errors:
            self._breaker.observe(error_class, error)
        self._stop_if_tripped()
        self.progress.rerendered += counts.rerendered
        async with self._plan_lock:
            await planner.look_up(callable_items)
            calls, reposts = self._sort(callable_items)
        if reposts:
            await self._repost(store, reposts)
        return calls

    async def _may_send(self, calls: list[Call], call: Call) -> bool:
        """Count `call` as sent, or (stopping, over budget) drop it and the rest of `calls`.

        When the calls in flight are expected to bring spend to the cap, wait for them to
        settle and look again.
        """
        while not self._stop_feeding.is_set():
            estimate = 0.0 if self._budget.cap_usd is None else estimate_call_usd(
                self._price, call.request_json, self._reserve.cap)
            verdict = self._budget.take(self.progress.cost_usd, estimate)
            if verdict is Verdict.GO:
                return True
            if verdict is Verdict.STOP:
                break
            self._settled.clear()
            await self._settled.wait()
        if self._budget.reached is not None:
            self.progress.stopping = "budget reached"
        elif self._budget.limit is not None and self._budget.sent >= self._budget.limit:
            self.progress.limited = self._budget.limit
        for unsent in calls[calls.index(call):]:
            self._in_flight.pop(unsent.key, None)  # their items stay pending
        return False

    def _sort(self, items: list[Planned]) -> tuple[list[Call], list[Planned]]:
        """Decide each item: the new calls to send, and the items to post from stored replies."""
        calls, reposts = [], []
        options = self.options
        for planned in items:
            assert planned.call is not None
            key = planned.call.key
            action = decide(planned.known, key, self._post.fingerprint, options.retry_failed,
                            options.error_class, options.recall)
            if action is Action.SKIP_DONE:
                self.progress.skipped += 1
                self.progress.done += 1
            elif action is Action.SKIP_FAILED:
                self.progress.failed += 1
            elif action is Action.POST:
                reposts.append(planned)
            elif action is Action.CALL:
                waiting = self._in_flight.get(key)
                if waiting is not None:
                    waiting.append(planned)  # the same request is on its way: share its reply
                    self.progress.reused += 1
                    continue
                self._in_flight[key] = [planned]
                calls.append(planned.call)
        return calls, reposts

    async def _repost(self, store: Store, items: list[Planned]) -> None:
        """Make outputs from stored replies (post steps or the items changed): no call."""
        bodies = await store.reply_bodies(p.known.reply_id for p in items
                                          if p.known.reply_id is not None)
        await store.save(self._outcomes.from_stored(items, bodies))

    async def _deliver(self, store: Store, result: CallResult) -> None:
        """Post-process a call's result for every item waiting on it and commit it all."""
        key = result.call.key
        self._budget.settle()
        self._settled.set()
        if result.unsent:
            async with self._plan_lock:
                self._in_flight.pop(key, None)
            return
        waiting = self._in_flight[key]
        taken = len(waiting)
        response = self._outcomes.response(result)
        settled = self._outcomes.for_result(result, waiting, response, result.attempts)
        settled.outputs[0].bought = response is not None
        await store.save(settled)
        self.progress.completed += taken
        self._stop_if_tripped()
        async with self._plan_lock:
            late = self._in_flight.pop(key)[taken:]
        if late:
            # items that came to wait while the result was being committed
            settled = self._outcomes.for_result(result, late, None, [])
            for output in settled.outputs:
                output.response_id = response.id if response is not None else None
            await store.save(settled)

    def _stop_if_tripped(self) -> None:
        """Items keep failing the same way: send nothing more; what is in flight finishes."""
        if self._breaker.tripped is not None and not self._stop_feeding.is_set():
            self.progress.stopping = "items keep failing the same way"
            self._stop_feeding.set()

    async def _tick(self, executor: Executor, limiter: RateLimiter) -> None:
        while True:
            self.progress.observe(executor.counters, limiter.stats())
            if self._on_progress is not None:
                self._on_progress(self.progress)
            await asyncio.sleep(TICK_S)


async def run_pipeline(config: PipelineConfig, options: RunOptions,
                       on_progress: ProgressHook | None = None) -> RunSummary:
    """Run `config` once; see `Run`."""
    return await Run(config, options, on_progress).execute()
