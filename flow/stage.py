"""One call stage of a run: its items planned, its calls sent, their results settled, and
each item it finishes handed to the next stage as soon as it is committed.

The first stage reads the input; a later stage reads its `Inbox`, filled by the stage
before it, so there is no barrier between stages: an item enters stage 2 once its stage-1
output is on disk. A stage's templates see the row's fields and each earlier stage's
`output` by name. An item that fails at a stage is recorded as stopped at every later one;
one whose `when:` is false is recorded as skipped there and goes on without that stage.

Items that render a request already in flight wait for its reply instead of paying for it
again; the in-flight table changes only under the stage's plan lock, so planning never
misses a reply committed while it looked up the store.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from flow.budget import Breaker, Budget, Verdict
from flow.config import PipelineConfig
from flow.delivery import Delivery
from flow.errors import TemplateError
from flow.execute import FLUSH
from flow.inbox import Inbox
from flow.load import Row, read_rows
from flow.plan import (
    BATCH_ROWS,
    Action,
    Planned,
    Planner,
    RunOptions,
    batches,
    prepare,
    render_planned,
)
from flow.post import PostProcessor
from flow.prices import Price, estimate_call_usd, price_for
from flow.progress import RunProgress
from flow.reask import Reasker, Send, stored_result
from flow.records import Call, CallResult, ItemRecord, utc_now
from flow.render import Condition, RequestBuilder
from flow.settle import Outcomes
from flow.store import Store
from flow.tokens import OutputReserve
from flow.unchanged import render_fingerprint, skip_unchanged

INBOX_ITEMS = 4 * BATCH_ROWS  # items waiting for a stage at most: the stage before waits


@dataclass
class RunContext:
    """What every stage of one run shares."""

    config: PipelineConfig
    options: RunOptions
    store: Store
    origin: str
    progress: RunProgress
    budget: Budget
    breaker: Breaker
    stop_feeding: asyncio.Event
    settled: asyncio.Event  # a call sent has its result: the budget may look again
    stop_if_tripped: Callable[[], None]


class Stage:
    """One stage of the chain: what it renders, sends and makes of replies, and its items
    on their way. Built before the store opens (config errors first); `attach` starts it."""

    def __init__(self, config: PipelineConfig, index: int, progress: RunProgress,
                 breaker: Breaker) -> None:
        chain = config.chain
        self.config = chain[index]
        self.name = self.config.name
        self.first = index == 0
        key = "call" if config.stages is None else f"stages[{index}]"
        where = f"{config.file}: "
        self.builder = RequestBuilder(self.config, where, config.step_timeout_s, key)
        self.when = (None if self.config.when is None else
                     Condition(self.config.when, f"{key}.when", config.step_timeout_s))
        self.post = PostProcessor(self.config.post_steps, config.file.parent,
                                  config.step_timeout_s,
                                  self.config.on_truncated, self.config.checker)
        self.price: Price | None = price_for(self.config.model, self.config.price)
        self.reserve = OutputReserve(self.config.params, 0 if self.config.endpoint ==
                                     "embeddings" else self.config.expected_output_tokens)
        self.outcomes = Outcomes(self.post, self.price, "", progress, breaker, self.name,
                                 last=index == len(chain) - 1)
        self.inbox: Inbox[Planned] | None = None if self.first else Inbox(INBOX_ITEMS)
        self.next: Stage | None = None
        self._later = [stage.name for stage in chain[index + 1:]]
        self._source = config.load.path.name
        self._in_flight: dict[str, list[Planned]] = {}
        self._plan_lock = asyncio.Lock()
        self._unchanged = 0  # rows skipped as done and unchanged, this run
        self._held_back = False  # a call the budget (or a stop) did not let go
        # a batch's items (or a shared queue's) wait in the store, not in memory: they are
        # found by request key when their results come
        self.in_store = self.config.executor == "batch"
        self.delivery = Delivery(self.name, self.outcomes, [s.name for s in chain],
                                 self._in_flight, self._plan_lock, settles=not self.in_store)
        self.deliver = self.delivery.deliver
        self._send_reask: Send | None = None
        self._run: RunContext | None = None
        self._planner: Planner | None = None

    def attach(self, run: RunContext) -> None:
        """Start the stage in a run whose store is open."""
        self._run = run
        self.outcomes.origin = run.origin
        self._planner = Planner(run.store, run.origin, self._source, self.name, self._later)
        self.delivery.attach(run, self._planner)
        if self.next is not None:
            self.delivery.next_inbox = self.next.inbox

    def send_reasks_with(self, send: Send) -> None:
        """Re-ask replies that break the stage's schema through `send` (the online
        executor's one call), a batch stage's too: its lines' re-asks go out online."""
        if self.post.schema is not None and self.config.schema_retries:
            self._send_reask = send
            self.delivery.reask_parallel = self.config.concurrency
            self.delivery.reasker = Reasker(self.post, self.config.schema_retries, self._reask,
                                            self.delivery.keep)

    async def _reask(self, call: Call) -> CallResult:
        """A re-ask's result: read back when the store holds a reply to it already, else sent
        once the budget lets it go (unsent when it does not, or the run is stopping)."""
        run, _ = self._context()
        stored = await run.store.stored_replies(run.origin, [call.key])
        if call.key in stored:
            return stored_result(call, *stored[call.key])
        if not await self._may_send([call], call, online=True):
            now = utc_now()
            return CallResult(call, now, now, 0.0, [], unsent=True)
        try:
            assert self._send_reask is not None
            return await self._send_reask(call)
        finally:
            run.budget.settle()
            run.settled.set()

    async def calls(self) -> AsyncIterator[Call | None]:
        """The distinct calls this stage needs, batch after batch; a `FLUSH` (a stage that
        packs) before it waits for the calls in flight to settle.

        The first stage renders batch N+1 while batch N's look-ups run on the store's
        thread; at the input's end it names held rows and forgets items whose rows are gone.
        A later stage plans what its inbox holds as it comes.
        """
        run, planner = self._context()
        if not self.first:
            assert self.inbox is not None
            while (batch := await self.inbox.take(BATCH_ROWS)) is not None:
                if run.stop_feeding.is_set():
                    return
                calls = await self._plan(batch)
                async for call in self._sendable(calls):
                    yield call
                if self._held_back:
                    return
            return
        await run.store.begin_seen_ids()
        fingerprint = render_fingerprint(run.config.load, self.config)
        unchanged = await run.store.begin_rendering(self.name, fingerprint)
        planning: asyncio.Task[list[Call]] | None = None
        try:
            for rows in itertools.chain(batches(read_rows(run.config.load)), [None]):
                run.progress.rows += len(rows or ())
                # rendered here, while the batch before is looked up on the store's thread
                prepared = (prepare(rows, self.builder, self._source)
                            if rows and not unchanged else None)
                if planning is not None:
                    calls, planning = await planning, None
                    async for call in self._sendable(calls):
                        yield call
                    if self._held_back:
                        return
                if rows is None:
                    break
                if run.stop_feeding.is_set():
                    return
                planning = asyncio.create_task(self._plan(prepared) if prepared is not None
                                               else self._plan_changed(rows))
                if prepared is None:
                    # let it hand the batch to the store's thread before the next is read
                    await asyncio.sleep(0)
        finally:
            if planning is not None:
                planning.cancel()
        await planner.name_held()
        run.progress.input_read = True
        names = list(run.progress.stages)
        run.progress.removed = await run.store.forget_unseen(self.name, self._unchanged)
        for name in names[1:]:
            await run.store.forget_unseen(name)
        await run.store.forget_stages(names)
        await run.store.end_rendering(self.name, fingerprint)

    async def plan_entered(self, batch: list[Planned]) -> list[Call]:
        """A later stage on a shared store: a batch its inbox brought, planned, recorded and
        handed on as in a run; the requests to queue for workers (nothing is sent here, so
        the budget is not asked)."""
        return await self._plan(batch)

    async def _plan_changed(self, rows: list[Row]) -> list[Call]:
        """Skip the rows done before and unchanged since, without rendering them; plan the
        rest of the batch in full."""
        run, _ = self._context()
        first_rows, rest, done = await skip_unchanged(run.store, self.name, run.origin,
                                                      self.post.fingerprint, rows,
                                                      with_output=bool(self._later))
        self.outcomes.count_done_before(len(done))
        self._unchanged += len(done)  # distinct items: each the first row with its id
        if self._later:
            await self.delivery.forward([
                (Planned(row, ItemRecord(row.item_id, row.number, None, None), None), output)
                for row, output in done], fresh=False)
        return await self._plan(prepare(rest, self.builder, self._source), first_rows)

    async def _plan(self, prepared: list[Planned],
                    first_rows: dict[str, int] | None = None) -> list[Call]:
        """Record a batch, decide each item, post what stored replies serve, pass on what is
        done: the batch's new calls."""
        run, planner = self._context()
        if self.first:
            callable_items = await planner.record(prepared, first_rows)
        else:
            callable_items = await self._record(prepared)
        counts = planner.take_counts()
        self.outcomes.count_failed(counts.failed)
        for error_class, error in counts.errors:
            run.breaker.observe(error_class, error)
        run.stop_if_tripped()
        run.progress.rerendered += counts.rerendered
        async with self._plan_lock:
            await planner.look_up(callable_items)
            calls, reposts, done, failed = self._sort(callable_items)
        if reposts:
            await self.delivery.repost(reposts)
        await self.delivery.forward([(p, p.known.output) for p in done], fresh=False)
        await planner.stop_later([ItemRecord(p.record.item_id, p.row.number, None, None,
                                             p.known.error_class, p.known.error)
                                  for p in failed])
        return calls

    async def _record(self, entered: list[Planned]) -> list[Planned]:
        """A later stage's batch: `when:` decided, requests rendered, records saved; the
        items that can be called. Skipped items go on at once."""
        run, planner = self._context()
        records, callable_items, skipped, failed = [], [], [], []
        for planned in entered:
            where = f"{self._source} row {planned.row.number}"
            try:
                fields = {**(planned.row.fields or {}), **planned.upstream}
                planned.record.skipped = (self.when is not None
                                          and not self.when.holds(fields, where))
            except TemplateError as e:  # the item fails at this stage
                planned.error = e
            if planned.record.skipped:
                skipped.append(planned)
            elif (error := render_planned(planned, self.builder, self._source).error):
                planned.record.error_class, planned.record.error = error.error_class, str(error)
                failed.append(planned.record)
            else:
                callable_items.append(planned)
            records.append(planned.record)
        await planner.save(records)
        self.outcomes.count_skipped(len(skipped))
        self.outcomes.count_failed(len(failed))
        for record in failed:
            run.breaker.observe(record.error_class, record.error)
        await planner.stop_later(failed)
        await self.delivery.forward([(p, None) for p in skipped], fresh=False)
        return callable_items

    def _sort(self, items: list[Planned]) -> tuple[list[Call], list[Planned], list[Planned],
                                                   list[Planned]]:
        """Decide each item: the new calls to send, the items to post from stored replies,
        those done before and those failed before (with a paid reply)."""
        run, _ = self._context()
        calls, reposts, done, failed = [], [], [], []
        for planned in items:
            assert planned.call is not None
            key = planned.call.key
            action = run.options.decide(planned.known, key, self.post.fingerprint, self.name,
                                        planned.fresh)
            if action is Action.SKIP_DONE:
                done.append(planned)
            elif action is Action.SKIP_FAILED:
                failed.append(planned)
            elif action is Action.POST and key in self._in_flight:
                # its reply is stored and being re-asked: the item waits for that exchange
                self._in_flight[key].append(planned)
                run.progress.reused += 1
            elif action is Action.POST:
                reposts.append(planned)
            elif action is Action.CALL and self.in_store:
                calls.append(planned.call)  # the batch executor skips what a batch holds
            elif action is Action.CALL:
                waiting = self._in_flight.get(key)
                if waiting is not None:
                    waiting.append(planned)  # the same request is on its way: share its reply
                    run.progress.reused += 1
                    continue
                self._in_flight[key] = [planned]
                calls.append(planned.call)
        self.outcomes.count_done_before(len(done))
        self.outcomes.count_failed(len(failed))
        return calls, reposts, done, failed

    @property
    def _packed(self) -> bool:
        """Whether the calls this stage yields are packed, many to a request, as they come
        (an embeddings stage that sends them now, not queued or batched)."""
        return self.config.endpoint == "embeddings" and not self.in_store

    async def _sendable(self, calls: list[Call]) -> AsyncIterator[Call | None]:
        """`calls`, each once the budget lets it go; `_held_back` once one may not (stopping,
        over budget), the rest dropped. Before it waits for the calls in flight to settle, a
        stage that packs yields `FLUSH`: the calls gathered into a pack are counted in
        flight, and they settle only once their pack goes."""
        run, _ = self._context()
        for call in calls:
            while (verdict := self._take(call)) is Verdict.WAIT:
                run.settled.clear()
                if self._packed:
                    yield FLUSH
                await run.settled.wait()
            if verdict is Verdict.STOP:
                self._held_back = True
                self._not_sent(calls, call)
                return
            yield call

    async def _may_send(self, calls: list[Call], call: Call, online: bool = False) -> bool:
        """Count `call` as sent, or (stopping, over budget) drop it and the rest of `calls`.

        When the calls in flight are expected to bring spend to the cap, wait for them to
        settle and look again.
        """
        run, _ = self._context()
        while (verdict := self._take(call, online)) is Verdict.WAIT:
            run.settled.clear()
            await run.settled.wait()
        if verdict is Verdict.GO:
            return True
        self._not_sent(calls, call)
        return False

    def _take(self, call: Call, online: bool = False) -> Verdict:
        """Whether `call` may go now (`GO` counts it as sent), must wait for the calls in
        flight to settle, or may not go (`STOP`: stopping, over budget)."""
        run, _ = self._context()
        if run.stop_feeding.is_set():
            return Verdict.STOP
        budget = run.budget
        # a batch's cost is checked against the cap before each create, at batch prices
        priced = budget.cap_usd is not None and (online or not self.in_store)
        estimate = 0.0 if not priced else estimate_call_usd(
            self.price, call.request_json, self.reserve.cap)
        verdict = budget.take(run.progress.cost_usd, estimate)
        if verdict is Verdict.GO and self.in_store and not online:
            # a batch's line is counted as sent, never as in flight: its batch was
            # budgeted at its worst, and items that share a request (or a line a batch
            # answered before) are not delivered one by one to settle it
            budget.settle()
        return verdict

    def _not_sent(self, calls: list[Call], call: Call) -> None:
        """`call` and the rest of `calls` do not go: their items stay pending."""
        run, _ = self._context()
        budget, progress = run.budget, run.progress
        if budget.reached is not None:
            progress.stopping = "budget reached"
        elif budget.limit is not None and budget.sent >= budget.limit:
            progress.limited = budget.limit
        for unsent in calls[calls.index(call):]:
            self._in_flight.pop(unsent.key, None)  # their items stay pending

    def _context(self) -> tuple[RunContext, Planner]:
        assert self._run is not None and self._planner is not None
        return self._run, self._planner

