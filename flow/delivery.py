"""What a stage does with a result: commit it for every item waiting on it, then hand the
items on to the next stage (or record them as stopped at every later one).

Online, the items waiting on a call are in memory (the stage's in-flight table). A batch
runs for hours, across runs: its results are matched to their items in the store, by
request key, when they are collected, so nothing waits in memory meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flow.inbox import Inbox
from flow.load import Row
from flow.plan import Planned, Planner
from flow.reask import Exchange, Reasker, stored_result
from flow.records import CallResult, ItemRecord, Known, OutputRecord, Settled
from flow.settle import Outcomes
from flow.store.shards import Waiting

if TYPE_CHECKING:
    from flow.stage import RunContext


class Delivery:
    """A stage's results, committed and handed on."""

    def __init__(self, name: str, outcomes: Outcomes, stages: Sequence[str],
                 in_flight: dict[str, list[Planned]], plan_lock: asyncio.Lock,
                 settles: bool = True) -> None:
        self._name = name
        self._settles = settles  # a result settles a call the budget counts in flight
        self._outcomes = outcomes
        self._first = stages[0]
        self._earlier = list(stages[:stages.index(name)])
        self._in_flight = in_flight
        self._plan_lock = plan_lock
        self.next_inbox: Inbox[Planned] | None = None
        self._run: RunContext | None = None
        self._planner: Planner | None = None
        self.reasker: Reasker | None = None  # a stage with a schema
        self._reasking: set[asyncio.Task[None]] = set()  # a batch's lines being re-asked
        self.reask_parallel = 1  # stored replies re-asked at once (the stage's concurrency)

    def attach(self, run: RunContext, planner: Planner) -> None:
        """Start delivering in a run whose store is open."""
        self._run, self._planner = run, planner

    async def deliver(self, result: CallResult) -> None:
        """Post-process a call's result for every item waiting on it, commit it all, and
        pass the items on."""
        run, _ = self._context()
        key = result.call.key
        if self._settles:
            run.budget.settle()
        run.settled.set()
        if result.unsent:
            async with self._plan_lock:
                self._in_flight.pop(key, None)
            return
        async with self._plan_lock:
            waiting = self._in_flight.get(key)
        if waiting is None:
            await self.deliver_stored(result)
            return
        taken = len(waiting)
        exchange = Exchange(result) if self.reasker is None else await self.reasker.exchange(
            result)
        settled = await self._settle(exchange, waiting)
        if settled is None:  # a re-ask was due and not sent: the items wait for the next run
            async with self._plan_lock:
                self._in_flight.pop(key, None)
            return
        if self.next_inbox is None:
            run.progress.completed += taken
        run.stop_if_tripped()
        async with self._plan_lock:
            late = self._in_flight.pop(key)[taken:]
        outputs = settled.outputs
        if late:
            # items that came to wait while the result was being committed
            more = self._outcomes.for_result(exchange.final, late, None, [])
            for output in more.outputs:
                output.response_id = outputs[0].response_id
            await run.store.save(more)
            outputs = outputs + more.outputs
        await self.pass_on(waiting[:taken] + late, outputs)

    async def keep(self, result: CallResult) -> CallResult:
        """Store a paid reply that breaks the schema, with its attempts, before its re-ask:
        the result as read back from the store (a reply stored already is left as it is)."""
        if result.stored_id is not None or result.body is None:
            return result
        run, _ = self._context()
        response = self._outcomes.response(result)
        if response is None:
            return result
        await run.store.save(Settled(self._name, run.origin, result.call.key,
                                     result.finished_at, response, result.attempts, []))
        assert response.id is not None
        return stored_result(result.call, response.id, result.body)

    async def _settle(self, exchange: Exchange, waiting: list[Planned],
                      lease: int | None = None) -> Settled | None:
        """Commit an exchange: the replies that broke the schema first (kept, each under its
        own request), then the outputs the reply that stands gives `waiting` (under a
        worker's `lease`, only if it is still its own); None, with only the paid replies
        kept, when it stopped before its last re-ask."""
        run, _ = self._context()
        kept = exchange.invalid + ([exchange.final] if exchange.stopped else [])
        for earlier in kept:
            if earlier.stored_id is None:  # bought in this run
                await run.store.save(Settled(self._name, run.origin, earlier.call.key,
                                             earlier.finished_at,
                                             self._outcomes.response(earlier),
                                             earlier.attempts, []))
        if exchange.stopped:
            return None
        result = exchange.final
        if result.stored_id is None:
            response = self._outcomes.response(result)
            settled = self._outcomes.for_result(result, waiting, response, result.attempts)
            if settled.outputs:
                settled.outputs[0].bought = response is not None
        else:  # a re-ask the store answered before: read back, its payer chosen again
            settled = self._outcomes.for_result(result, waiting, None, [])
            for output in settled.outputs:
                output.response_id = result.stored_id
            settled.reassign = sorted({*settled.reassign, result.stored_id})
        settled.lease = lease
        await run.store.save(settled)
        return settled

    async def deliver_stored(self, result: CallResult, lease: int | None = None,
                             found: list[Waiting] | None = None) -> None:
        """A result no item waits on in memory (a batch's, a worker's): its reply is stored,
        and every item of this stage whose request it answers is found in the store and
        settled; under a worker's `lease`, only if the lease is still its own. `found`:
        those items, when the caller looked them up already."""
        run, _ = self._context()
        key = result.call.key
        response = self._outcomes.response(result)
        if found is None:
            found = await run.store.shards.waiting_on(self._name, run.origin, [key],
                                                      self._first)
        upstream = await run.store.shards.outputs_of([f[0] for f in found], self._earlier)
        items = []
        for item_id, row, _, text, response_id, bought in found:
            fields = json.loads(text) if text else None
            planned = Planned(Row(row, item_id, fields), ItemRecord(item_id, row, None, key),
                              None, result.call, Known(response_id=response_id, bought=bought))
            planned.upstream = {stage: {"output": json.loads(output)} for stage, output
                                in upstream.get(item_id, {}).items()}
            items.append(planned)
        if items and response is not None and self.reasker is not None and (
                self.reasker.wants(result)):
            # a reply that breaks the schema: kept at once (never bought twice), then
            # re-asked online; its items settle when that ends
            await run.store.save(Settled(self._name, run.origin, key, result.finished_at,
                                         response, result.attempts, []))
            assert response.id is not None and result.body is not None
            first = stored_result(result.call, response.id, result.body)
            if lease is not None:  # a worker's: re-asked under its lease, committed fenced
                await self._reask_stored(first, items, lease)
                return
            # a batch's line: beside the collection
            task = asyncio.create_task(self._reask_stored(first, items))
            self._reasking.add(task)
            task.add_done_callback(self._reasked_one)
            return
        settled = self._outcomes.for_result(result, items, response, result.attempts)
        if settled.outputs:
            settled.outputs[0].bought = response is not None
        settled.lease = lease
        outputs = list(settled.outputs)
        await run.store.save(settled)
        if settled.rejected:
            self._outcomes.take_back(outputs)
            return  # another worker took the request over: its result stands
        if self.next_inbox is None:
            run.progress.completed += len(items)
        run.stop_if_tripped()
        await self.pass_on(items, settled.outputs, fresh=True)

    async def _reask_stored(self, first: CallResult, items: list[Planned],
                            lease: int | None = None) -> None:
        assert self.reasker is not None
        run, _ = self._context()
        settled = await self._settle(await self.reasker.exchange(first), items, lease)
        if settled is None:
            return  # not sent (a stop, the budget): the items wait for the next run
        if settled.rejected:
            self._outcomes.take_back(settled.outputs)
            return  # another worker took the request over: its result stands
        if self.next_inbox is None:
            run.progress.completed += len(items)
        run.stop_if_tripped()
        await self.pass_on(items, settled.outputs, fresh=True)

    def _reasked_one(self, task: asyncio.Task[None]) -> None:
        """Forget a line's re-asks once they end well; one that failed stays for `drain`
        to raise, so that a run whose results were not all committed never ends as finished."""
        if task.cancelled() or task.exception() is None:
            self._reasking.discard(task)

    async def drain(self) -> None:
        """Wait for the re-asks of a batch's lines still out."""
        while self._reasking:
            await asyncio.gather(*self._reasking)

    async def abandon(self) -> None:
        """End the re-asks still out (a second Ctrl-C, a fatal error): like any call in
        flight then, a reply not in yet is not waited for; the reply each corrects is kept."""
        for task in self._reasking:
            task.cancel()
        await asyncio.gather(*self._reasking, return_exceptions=True)
        self._reasking.clear()

    async def repost(self, items: list[Planned]) -> None:
        """Make outputs from stored replies (post steps or the items changed): no call, unless
        a stored reply now breaks the schema and its re-ask was never answered."""
        run, _ = self._context()
        bodies = await run.store.reply_bodies(p.known.reply_id for p in items
                                              if p.known.reply_id is not None)
        if self.reasker is not None:
            # one exchange per stored reply, as many at once as the stage sends calls: a
            # resume with many re-asks pending is not one round trip after another
            groups: dict[tuple[str, int | None], list[Planned]] = {}
            for planned in items:
                assert planned.call is not None
                groups.setdefault((planned.call.key, planned.known.reply_id), []).append(planned)
            turns = asyncio.Semaphore(self.reask_parallel)

            async def reasked(group: list[Planned]) -> bool:
                async with turns:
                    return await self._reasked(group, bodies)

            handled = await asyncio.gather(*(reasked(g) for g in groups.values()))
            items = [p for group, done in zip(groups.values(), handled) if not done
                     for p in group]
            if not items:
                return
        settled = self._outcomes.from_stored(items, bodies)
        await run.store.save(settled)
        await self.pass_on(items, settled.outputs)

    async def _reasked(self, items: list[Planned], bodies: dict[int, str]) -> bool:
        """Whether the stored reply `items` share broke the schema and went through its
        re-asks (read back from the store where it holds them), their outputs committed and
        passed on."""
        assert self.reasker is not None and items[0].call is not None
        reply_id = items[0].known.reply_id
        assert reply_id is not None
        exchange = await self.reasker.exchange(
            stored_result(items[0].call, reply_id, bodies.get(reply_id, "")))
        if not exchange.invalid and not exchange.stopped:
            return False  # the stored reply stands: made into an output with the others
        settled = await self._settle(exchange, items)
        if settled is not None:
            await self.pass_on(items, settled.outputs)
        return True

    async def pass_on(self, items: list[Planned], outputs: list[OutputRecord],
                      fresh: bool = True) -> None:
        """Hand the items made anew here to the next stage; record the failed ones as
        stopped at every later stage."""
        _, planner = self._context()
        done = [(p, o.output) for p, o in zip(items, outputs) if o.status == "done"]
        await self.forward(done, fresh=fresh)
        await planner.stop_later([
            ItemRecord(o.item_id, p.row.number, None, None, o.error_class, o.error)
            for p, o in zip(items, outputs) if o.status != "done"])

    async def forward(self, items: list[tuple[Planned, str | None]], fresh: bool) -> None:
        """Hand items to the next stage, each with this stage's output (None: skipped here,
        so templates after see no `<stage>` at all)."""
        if self.next_inbox is None or not items:
            return
        entered = []
        for planned, output in items:
            upstream: dict[str, Any] = dict(planned.upstream)
            if output is not None:
                upstream[self._name] = {"output": json.loads(output)}
            entered.append(Planned(planned.row, ItemRecord(planned.record.item_id,
                                                           planned.row.number, None, None),
                                   None, upstream=upstream, fresh=fresh or planned.fresh))
        await self.next_inbox.put(entered)

    def _context(self) -> tuple[RunContext, Planner]:
        assert self._run is not None and self._planner is not None
        return self._run, self._planner
