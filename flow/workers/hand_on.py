"""A worker's later stages of a chain: each item a commit hands on is planned (its `when:`,
its request rendered and keyed, what the store holds for it) and its request queued for any
worker to claim, right after the commit that made its earlier output.

A worker killed between that commit and the queueing leaves the item done at one stage and
missing at the next. Each worker looks for such items (`find_stranded`) when it starts and
when the queue runs dry, and plans them again, as `flow plan` does: an item or a request is
recorded once, and a request whose reply is stored is never queued again (the item is made
from the reply).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

from flow.load import Row
from flow.plan import BATCH_ROWS, Planned
from flow.records import ItemRecord
from flow.stage import Stage
from flow.store.postgres.store import PostgresStore

STRANDED_CHUNK = 1000  # items looked for at a time


class HandOn:
    """Plans the items handed to each later stage and queues their requests."""

    def __init__(self, stages: Sequence[Stage], store: PostgresStore, origin: str,
                 on_queued: Callable[[], None]) -> None:
        self._stages = list(stages)
        self._later = self._stages[1:]
        self._store = store
        self._origin = origin
        self._on_queued = on_queued  # work may have come: a worker waiting for it looks
        self._busy = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._last_found: set[tuple[str, str]] = set()
        self.failure: Exception | None = None  # a store error: the worker stops with it

    def start(self) -> None:
        """Start planning each later stage's inbox."""
        self._tasks = [asyncio.create_task(self._plan(stage)) for stage in self._later]

    @property
    def idle(self) -> bool:
        """Nothing handed on is waiting or being planned."""
        return self._busy == 0 and not any(stage.inbox for stage in self._later)

    async def close(self) -> None:
        """Plan what was handed on already, then stop."""
        for stage in self._later:
            assert stage.inbox is not None
            await stage.inbox.end()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Stop now (a fatal error, a stop that cannot wait): what was not queued yet is
        found again by the next worker or plan."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _plan(self, stage: Stage) -> None:
        assert stage.inbox is not None
        try:
            while (batch := await stage.inbox.take(BATCH_ROWS)) is not None:
                # counted busy before anything can look: `take` returned without a pause
                self._busy += 1
                try:
                    calls = await stage.plan_entered(batch)
                    await self._store.queue.enqueue(
                        stage.name, self._origin, [(c.key, c.request_json) for c in calls],
                        paid_again=False)
                finally:
                    self._busy -= 1
                    self._on_queued()
        except Exception as e:
            self.failure = e
            await stage.inbox.close()  # whoever hands on does not wait for it
            self._on_queued()

    async def find_stranded(self) -> int:
        """Hand each later stage the items it lacks; how many. Items found again just as
        before (nothing planning can mend) count as none."""
        names = [stage.name for stage in self._stages]
        found: set[tuple[str, str]] = set()
        for index, stage in enumerate(self._later, 1):
            assert stage.inbox is not None
            after = -1
            while chunk := await self._store.queue.stranded(self._origin, names, index, after,
                                                            STRANDED_CHUNK):
                after = chunk[-1][1]
                ids = [item_id for item_id, _, text in chunk if text is not None]
                upstream = await self._store.shards.outputs_of(ids, names[:index])
                entered = []
                for item_id, row, text in chunk:
                    if text is None:
                        continue  # never read at the first stage: nothing to render from
                    found.add((stage.name, item_id))
                    earlier = {name: {"output": json.loads(output)}
                               for name, output in upstream.get(item_id, {}).items()}
                    entered.append(Planned(Row(row, item_id, json.loads(text)),
                                           ItemRecord(item_id, row, None, None), None,
                                           upstream=earlier))
                await stage.inbox.put(entered)
        again = found == self._last_found
        self._last_found = found
        return 0 if again else len(found)
