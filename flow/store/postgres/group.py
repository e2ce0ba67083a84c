"""One group of results written to a PostgreSQL store, inside its commit's transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flow.records import Settled
from flow.store.postgres import sql as q
from flow.store.postgres.queue import WorkQueue
from flow.store.sqlite_sql import group_rows

if TYPE_CHECKING:
    import psycopg


async def write_group(db: psycopg.AsyncConnection[Any], queue: WorkQueue, group: list[Settled],
                      run_id: int) -> None:
    """Fence the group's leases, then write its replies (numbered from the sequence),
    attempts and outputs. A result whose lease another worker holds is marked `rejected`
    and keeps only its paid reply; one whose earlier commit landed is not written again."""
    accepted, landed = await queue.fence(db, group)
    written = [s for s in group if s.lease is None or s.lease not in landed]
    for settled in written:
        if settled.lease is not None and settled.lease not in accepted:
            settled.rejected = True
            settled.outputs, settled.reassign = [], []
    replies = sum(1 for s in written if s.response is not None)
    cursor = await db.execute(q.NEXT_IDS, (replies,))
    ids = iter([int(i) for (i,) in await cursor.fetchall()])
    for sql, params in q.group_writes(group_rows(written, run_id, ids)):
        await db.execute(sql, params)
