"""One group of results written to a PostgreSQL store: one transaction in two round trips.

The group's commit is pipelined (psycopg's pipeline mode): the transaction's start, the
fence of its leases and the reply ids from the sequence go in one flight; the rows in a
second (flushed whole however large, `write_group`), the commit in a third. Six round trips
a group, one after another, had held the store's throughput to the latency of the
connection, not to the work the server does.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from flow.config.store_url import StoreURL
from flow.errors import StoreError
from flow.records import Settled
from flow.store.postgres import sql as q
from flow.store.postgres.connect import Reconnects, connect
from flow.store.postgres.queue import FENCE_SQL, LANDED_SQL
from flow.store.sqlite_sql import group_rows

if TYPE_CHECKING:
    import psycopg


async def write_group(db: psycopg.AsyncConnection[Any], group: list[Settled],
                      run_id: int) -> None:
    """In one transaction: fence the group's leases, then write its replies (numbered from
    the sequence), attempts and outputs. A result whose lease another worker holds is
    marked `rejected` and keeps only its paid reply (no vector); one whose earlier commit landed (its
    connection broke before the answer came) is not written again."""
    tokens = [s.lease for s in group if s.lease is not None]
    replies = sum(1 for s in group if s.response is not None)
    async with db.pipeline() as pipeline, db.transaction():
        # a lease is `done` only by its own result's commit: the tokens still leased are
        # this group's to write; a lease taken over has a new token
        fenced = await db.execute(FENCE_SQL, (tokens,)) if tokens else None
        numbered = await db.execute(q.NEXT_IDS, (replies,))
        # a sync, not a flush: the server then sees the session idle in its transaction, so
        # a worker paused here has its session ended (and the leases' row locks freed) by
        # idle_in_transaction_session_timeout; after a mere flush it stays `active`
        await pipeline.sync()
        accepted = {int(t) for (t,) in await fenced.fetchall()} if fenced else set()
        landed: set[int] = set()
        others = [token for token in tokens if token not in accepted]
        if others:
            cursor = await db.execute(LANDED_SQL, (others,))
            landed = {int(t) for (t,) in await cursor.fetchall()}
        ids = iter([int(i) for (i,) in await numbered.fetchall()])  # gaps, if some landed
        written = [s for s in group if s.lease is None or s.lease not in landed]
        for settled in written:
            if settled.lease is not None and settled.lease not in accepted:
                settled.rejected = True
                settled.outputs, settled.reassign = [], []
                if settled.response is not None:  # kept as paid; the item's vector is
                    settled.response.vector = None  # the one the lease's holder stores
        # a batch's line was paid once, with its batch: the worker holding the lease stores it
        written = [s for s in written if not (s.rejected and s.response is not None
                                              and s.response.batch_id is not None)]
        # the rows in a pipeline of their own, whose end is a sync again before the commit:
        # a worker paused with its rows written (and locked) is then seen idle in its
        # transaction and ended, as after the fence. Not `pipeline.sync()`: that flushes
        # once, and with more rows than the socket's buffer takes (a group of vectors, or
        # of long replies: a few hundred KB) it waited for results the server could not
        # send, the rest of the rows unsent; leaving a pipeline flushes until all is sent
        async with db.pipeline():
            for sql, params in q.group_writes(group_rows(written, run_id, ids)):
                await db.execute(sql, params)


class GroupCommits:
    """The group writer's own connection to the store (claims and look-ups go on beside
    it), made when first needed; `rejected` counts the results whose lease another worker
    had taken (kept as attempts, nothing more)."""

    def __init__(self, url: StoreURL, idle_s: float, reconnects: Reconnects) -> None:
        self._url = url
        self._idle_s = idle_s
        self._reconnects = reconnects
        self._db: psycopg.AsyncConnection[Any] | None = None
        self.rejected = 0

    async def write(self, group: list[Settled], run_id: int, reconnects: bool) -> None:
        """Write one group in one transaction (`write_group`). A connection lost midway
        (the server restarted, or ended this session after a pause) is made again and the
        group written again; a result whose first commit did land is not written twice.
        `reconnects`: a first connection that fails is waited out too (a worker's). A group
        that has failed so for `RECONNECT_S` fails: an error that comes again on every new
        connection (the server out of disk) is not tried for good."""
        import psycopg

        failing_since: float | None = None
        while True:
            if self._db is None:
                try:
                    self._db = await connect(self._url, False, self._idle_s)
                except StoreError as e:
                    if not reconnects:
                        raise
                    # a server restarting: waited out, as a broken connection is below
                    self._db = await self._reconnects.connect(e)
            db = self._db
            try:
                await write_group(db, group, run_id)
                self.rejected += sum(1 for settled in group if settled.rejected)
                return
            except psycopg.Error as e:
                # a connection lost inside the pipeline may not be marked broken yet (its
                # error is "cannot exit pipeline mode while busy"): any operational error
                # is taken as a lost connection, which is made again
                lost = db.broken or db.closed or isinstance(e, psycopg.OperationalError)
                if not lost:
                    raise q.store_error(self._url, "cannot write results", e) from None
                with contextlib.suppress(psycopg.Error):
                    await db.close()
                self._db = None
                self._db = await self._reconnects.again(e, failing_since,
                                                        "cannot write results")
                failing_since = failing_since or time.monotonic()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
