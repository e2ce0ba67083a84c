"""One run of a pipeline: stream rows, skip what is done, call the rest, checkpoint each result.

A producer reads rows in batches, renders their requests, asks the store which are already
done and records the rest before any call is sent; a fixed pool of `concurrency` workers
takes them from a small bounded queue (so memory does not grow with the input), calls,
post-processes and hands each result to the store's writer.

Stopping: `request_stop()` once stops feeding new items and lets calls in flight finish for
up to `call.drain_s`; twice, or on a fatal error, stops at once. Either way every result
already received is committed before `execute()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flow.call import Caller, endpoint_origin, make_client
from flow.config import PipelineConfig
from flow.errors import ConfigError, FatalCallError, ItemError, PostError, TemplateError
from flow.limiter import LimiterStats, RateLimiter
from flow.load import Row, count_rows, read_rows
from flow.post import PostProcessor
from flow.prices import price_for
from flow.request import RequestBuilder, key_of_json
from flow.simulator import SimulatorConfig, serve
from flow.store import CallRecord, ItemRecord, KnownCall, Store, utc_now

STAGE = "call"
BATCH_ROWS = 1000
TICK_S = 0.25


@dataclass
class RunOptions:
    """How to run, beyond the pipeline file."""

    simulate: bool = False
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    limit: int | None = None
    retry_failed: bool = False
    error_class: str | None = None


@dataclass
class RunProgress:
    """Counters of a run in progress, read by the progress display."""

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    completed: int = 0
    rerendered: int = 0
    removed: int = 0
    in_flight: int = 0
    calls: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    limits: LimiterStats | None = None
    simulated: bool = False
    stopping: str | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started


@dataclass
class RunSummary:
    """How a run ended."""

    state: str
    progress: RunProgress
    run_id: int
    store: str
    message: str | None = None


@dataclass(slots=True)
class _Planned:
    row: Row
    record: ItemRecord
    error: ItemError | None
    request: dict[str, Any] | None = None
    request_json: str | None = None


@dataclass(slots=True)
class _Work:
    item_id: str
    key: str
    request: dict[str, Any]
    request_json: str


ProgressHook = Callable[[RunProgress], None]


def decide(known: KnownCall | None, post_key: str, retry_failed: bool,
           error_class: str | None) -> str:
    """What to do with an item whose request has `known` stored: call, repost or skip."""
    if retry_failed:
        if known is not None and known.status == "failed" and error_class in (
                None, known.error_class):
            return "call"
        if known is None:
            return "skip-pending"
    if known is None:
        return "call"
    if known.has_response and known.post_key != post_key:
        return "repost"
    if known.status == "done":
        return "skip-done"
    return "skip-failed" if known.has_response else "call"


class Run:
    """A run of one pipeline; `await Run(...).execute()` returns its `RunSummary`."""

    def __init__(self, config: PipelineConfig, options: RunOptions,
                 on_progress: ProgressHook | None = None) -> None:
        self.config = config
        self.options = options
        self.progress = RunProgress(simulated=options.simulate)
        self._on_progress = on_progress
        self._builder = RequestBuilder(config.call)
        self._post = PostProcessor(config.post, config.file.parent)
        self._stop_feeding = asyncio.Event()
        self._abort = asyncio.Event()
        self._fatal: FatalCallError | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._dispatched = 0
        self._spent_before = 0.0
        self._over_budget_message: str | None = None

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
        load = self.config.load
        self.progress.total = count_rows(load)
        store = await Store.open(self.config.store)
        state, message = "finished", None
        try:
            async with self._endpoint() as (base_url, api_key):
                client = make_client(self.config.call, base_url, api_key)
                origin = endpoint_origin(self.config.call.base_url, self.options.simulate)
                await store.start_run(self.config.file, origin, str(client.base_url))
                store.totals.items_total = self.progress.total
                self._spent_before = await store.spent_usd(origin)
                limiter = RateLimiter(self.config.call.rpm, self.config.call.tpm)
                caller = Caller(self.config.call, client, limiter, origin,
                                price_for(self.config.call.model, self.config.call.price),
                                api_key)
                try:
                    await self._run(store, caller, limiter, origin)
                finally:
                    await client.close()
            if self._fatal is not None:
                state, message = "stopped", str(self._fatal)
            elif self._over_budget_message is not None:
                state, message = "stopped", self._over_budget_message
            elif self._stop_feeding.is_set():
                state = "interrupted"
                message = self.progress.stopping
        except BaseException as e:
            state, message = "stopped", f"{type(e).__name__}: {e}"
            raise
        finally:
            self._count_into(store)
            with contextlib.suppress(Exception):
                await store.finish_run(state, message)
            await store.close()
        if self._fatal is not None:
            raise self._fatal
        return RunSummary(state, self.progress, store.run_id, str(self.config.store), message)

    @contextlib.asynccontextmanager
    async def _endpoint(self) -> AsyncIterator[tuple[str | None, str | None]]:
        if self.options.simulate:
            async with serve(self.options.simulator) as (url, _):
                yield url, "sk-simulated"
            return
        api_key = self.config.call.api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ConfigError(
                f"{self.config.file}: no API key: set OPENAI_API_KEY or call.api_key, "
                "or add --simulate to run against the built-in simulator")
        yield self.config.call.base_url, api_key

    async def _run(self, store: Store, caller: Caller, limiter: RateLimiter, origin: str) -> None:
        queue: asyncio.Queue[_Work | None] = asyncio.Queue(maxsize=self.config.call.concurrency)
        self._workers = [asyncio.create_task(self._work(queue, store, caller))
                         for _ in range(self.config.call.concurrency)]
        ticker = asyncio.create_task(self._tick(caller, limiter))
        producer = asyncio.create_task(self._produce(queue, store, origin))
        try:
            await self._until_done(producer, queue)
        finally:
            ticker.cancel()
            for task in (producer, *self._workers):
                task.cancel()
            await asyncio.gather(producer, *self._workers, ticker, return_exceptions=True)
            self._refresh(caller, limiter)

    async def _until_done(self, producer: asyncio.Task[None],
                          queue: asyncio.Queue[_Work | None]) -> None:
        """Wait for the producer and workers; on a stop request drain, then cut off.

        A producer or worker that fails (the store refusing a write, say) ends the run at
        once: the others would wait forever on a queue no one reads.
        """
        stop = asyncio.create_task(self._stop_feeding.wait())
        workers = asyncio.gather(*self._workers)
        try:
            waited: set[asyncio.Future[Any]] = {producer, stop, workers}
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            _raise_failure(producer, workers)
            if self._stop_feeding.is_set():
                producer.cancel()
                while not queue.empty():
                    queue.get_nowait()
                for _ in self._workers:
                    queue.put_nowait(None)
                abort = asyncio.create_task(self._abort.wait())
                draining: set[asyncio.Future[Any]] = {workers, abort}
                await asyncio.wait(draining, timeout=self.config.call.drain_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                abort.cancel()
            else:
                await workers
            _raise_failure(producer, workers)
        finally:
            stop.cancel()
            workers.cancel()
            with contextlib.suppress(BaseException):
                await workers

    async def _produce(self, queue: asyncio.Queue[_Work | None], store: Store,
                       origin: str) -> None:
        """Render batch N+1 while batch N's lookups run on the store's thread."""
        await store.begin_seen_ids()
        complete = True
        pending: asyncio.Task[bool] | None = None
        try:
            for batch in _batches(read_rows(self.config.load), BATCH_ROWS):
                prepared = self._prepare(batch)
                if pending is not None and not await pending:
                    complete, pending = False, None
                    break
                pending = asyncio.create_task(self._plan(prepared, queue, store, origin))
            if pending is not None:
                complete = await pending
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
        if complete:
            # the whole input was read: items whose rows are gone leave the results
            self.progress.removed = await store.forget_unseen(STAGE)
        for _ in self._workers:
            await queue.put(None)

    def _prepare(self, rows: list[Row]) -> list[_Planned]:
        """Render each row's request and key it (the CPU half of planning a batch)."""
        name = self.config.load.path.name
        prepared = []
        for row in rows:
            planned = _Planned(row, ItemRecord(row.item_id, row.number, None, None), row.error)
            if planned.error is None and row.fields is not None:
                try:
                    planned.request, planned.request_json = self._builder.build_with_json(
                        row.fields, f"{name} row {row.number}")
                    planned.record.request_key = key_of_json(planned.request_json)
                except TemplateError as e:
                    planned.error = e
            prepared.append(planned)
        return prepared

    async def _plan(self, prepared: list[_Planned], queue: asyncio.Queue[_Work | None],
                    store: Store, origin: str) -> bool:
        """Record a batch of rows, then queue those that need a call; False means stop."""
        if self._stop_feeding.is_set():
            return False
        first_rows = await store.mark_seen([(p.row.item_id, p.row.number) for p in prepared])
        name = self.config.load.path.name
        records: list[ItemRecord] = []
        work: list[tuple[ItemRecord, dict[str, Any], str]] = []
        renamed = []
        for planned in prepared:
            row, record, error = planned.row, planned.record, planned.error
            first_row = first_rows.get(row.item_id, row.number)
            if first_row != row.number:
                # recorded under an id of its own: the first row keeps the id
                record.item_id = f"{row.item_id}#row{row.number}"
                record.request_key = None
                renamed.append((record.item_id, row.number))
                error = ItemError(f"{name} row {row.number}: duplicate id {row.item_id!r} "
                                  f"(first at row {first_row}); ids must be unique (load.id)")
            if error is not None:
                record.error_class = "RowError" if type(error) is ItemError else error.error_class
                record.error = str(error)
                self.progress.failed += 1
            elif planned.request is not None and planned.request_json is not None:
                work.append((record, planned.request, planned.request_json))
            records.append(record)
        if renamed:
            await store.mark_seen(renamed)
        rows = [planned.row for planned in prepared]
        changed = await self._changed(store, origin, records)
        fields = {row.item_id: row.fields for row in rows}
        for record in changed:
            # serialized only when written: a re-run over unchanged rows writes nothing
            row_fields = fields.get(record.item_id)
            if row_fields is not None and record.error_class is None:
                record.input = json.dumps(row_fields, ensure_ascii=False)
        await store.save_items(STAGE, origin, changed)
        known = await store.known_calls(origin, [r.request_key for r, _, _ in work
                                                 if r.request_key])
        for record, request, request_json in work:
            assert record.request_key is not None
            action = decide(known.get(record.request_key), self._post.fingerprint,
                            self.options.retry_failed, self.options.error_class)
            if action == "skip-done":
                self.progress.skipped += 1
                self.progress.done += 1
            elif action == "skip-failed":
                self.progress.failed += 1
            elif action == "skip-pending":
                pass
            elif action == "repost":
                await self._repost(store, origin, record.request_key)
            else:
                if self._over_budget():
                    return False
                self._dispatched += 1
                await queue.put(_Work(record.item_id, record.request_key, request, request_json))
        await asyncio.sleep(0)
        return True

    async def _changed(self, store: Store, origin: str,
                       records: list[ItemRecord]) -> list[ItemRecord]:
        """The records that differ from what the store holds (most re-runs write nothing)."""
        stored = await store.known_items(STAGE, [r.item_id for r in records])
        changed = []
        for record in records:
            before = stored.get(record.item_id)
            if before == (record.row, record.request_key, origin, record.error_class,
                          record.error):
                continue
            if before is not None and before[1] != record.request_key:
                self.progress.rerendered += 1
            changed.append(record)
        return changed

    def _over_budget(self) -> bool:
        limit = self.options.limit
        if limit is not None and self._dispatched >= limit:
            return True
        cap = self.config.call.max_cost_usd
        spent = self._spent_before + self.progress.cost_usd
        if cap is not None and spent >= cap:
            self._over_budget_message = (
                f"spend reached call.max_cost_usd (${spent:.4f} of ${cap:.2f}); no new "
                "requests were started. Raise the cap and run again to go on")
            self.progress.stopping = "budget reached"
            return True
        return False

    async def _repost(self, store: Store, origin: str, key: str) -> None:
        """Apply changed post steps to a stored response: no call is made."""
        stored = await store.stored_response(key, origin)
        if stored is None:
            return
        raw, request = stored
        record = CallRecord(request_key=key, origin=origin, model=request["model"],
                            request=request, status="failed", started_at=utc_now(),
                            finished_at=utc_now(), response=raw)
        try:
            choice = json.loads(raw)["choices"][0]
            text, finish = choice["message"].get("content"), choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            text, finish = None, "unknown"
        if isinstance(text, str) and finish not in ("length", "content_filter"):
            self._apply_post(record, text)
        else:
            record.error_class = "ResponseError"
            record.error = f"stored response is unusable (finish_reason={finish})"
        await self._finish(record, store, counted_call=False)

    async def _work(self, queue: asyncio.Queue[_Work | None], store: Store,
                    caller: Caller) -> None:
        while (work := await queue.get()) is not None:
            if self._abort.is_set():
                return
            self.progress.in_flight += 1
            try:
                record, reply = await caller.call(work.key, work.request, work.request_json)
            except FatalCallError as e:
                if self._fatal is None:
                    self._fatal = e
                self._stop_feeding.set()
                self._abort.set()
                return
            finally:
                self.progress.in_flight -= 1
            if reply is not None:
                self._apply_post(record, reply.text)
            await self._finish(record, store, counted_call=True)

    def _apply_post(self, record: CallRecord, text: str) -> None:
        record.post_key = self._post.fingerprint
        try:
            output = self._post.apply(text)
            record.output = json.dumps(output, ensure_ascii=False)
            record.status, record.error_class, record.error = "done", None, None
        except PostError as e:
            record.status, record.error_class, record.error = "failed", e.error_class, str(e)

    async def _finish(self, record: CallRecord, store: Store, counted_call: bool) -> None:
        await store.save_call(record)
        progress = self.progress
        progress.completed += 1
        if record.status == "done":
            progress.done += 1
        else:
            progress.failed += 1
        if counted_call:
            progress.prompt_tokens += record.prompt_tokens or 0
            progress.completion_tokens += record.completion_tokens or 0
            progress.cost_usd += record.cost_usd or 0.0

    async def _tick(self, caller: Caller, limiter: RateLimiter) -> None:
        while True:
            self._refresh(caller, limiter)
            if self._on_progress is not None:
                self._on_progress(self.progress)
            await asyncio.sleep(TICK_S)

    def _refresh(self, caller: Caller, limiter: RateLimiter) -> None:
        counters = caller.counters
        self.progress.calls = counters.attempts
        self.progress.retries = counters.retries
        self.progress.rate_limited = counters.rate_limited
        self.progress.limits = limiter.stats()

    def _count_into(self, store: Store) -> None:
        totals, progress = store.totals, self.progress
        totals.items_done, totals.items_failed = progress.done, progress.failed
        totals.items_skipped, totals.calls_made = progress.skipped, progress.calls
        totals.prompt_tokens = progress.prompt_tokens
        totals.completion_tokens = progress.completion_tokens
        totals.cost_usd = progress.cost_usd


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _raise_failure(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def run_pipeline(config: PipelineConfig, options: RunOptions,
                       on_progress: ProgressHook | None = None) -> RunSummary:
    """Run `config` once; see `Run`."""
    return await Run(config, options, on_progress).execute()
