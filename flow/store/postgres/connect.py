"""Connecting to a PostgreSQL store, and bringing its schema up to date.

Each migration of `schema.MIGRATIONS` runs once, in its own transaction with its row in
`migrations`, under a transaction-level advisory lock: processes that open one store at the
same moment migrate it once, and the others wait for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from flow.config.store_url import StoreURL
from flow.errors import StoreError
from flow.store.postgres import require_psycopg
from flow.store.postgres.schema import MIGRATE_LOCK, MIGRATIONS
from flow.store.postgres.sql import store_error

if TYPE_CHECKING:
    import psycopg

CONNECT_TIMEOUT_S = 10
RECONNECT_S = 120  # a worker waits this long for the store to come back
RECONNECT_WAIT_S = 0.5
# a session left in a transaction this long (its process paused or hung) is ended by the
# server, so the rows it locked go to other workers; a worker's is no longer than its lease
IDLE_IN_TRANSACTION_S = 5.0


async def connect(url: StoreURL, migrate: bool = True,
                  idle_s: float = IDLE_IN_TRANSACTION_S) -> psycopg.AsyncConnection[Any]:
    """A connection to the store at `url` (autocommit: transactions are explicit), its
    schema migrated unless `migrate` is false (a reader); a transaction left idle for
    `idle_s` ends the session."""
    require_psycopg()
    import psycopg

    try:
        db = await psycopg.AsyncConnection.connect(
            url.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
            application_name="flow",
            options=f"-c idle_in_transaction_session_timeout={max(1, round(idle_s * 1000))}")
    except psycopg.Error as e:
        raise store_error(url, "cannot connect to the store", e) from None
    try:
        if migrate:
            await _migrate(db)
        else:
            await db.execute("SELECT 1 FROM outputs LIMIT 1")
    except psycopg.Error as e:
        await db.close()
        doing = "cannot prepare the store" if migrate else (
            "cannot read the store (run the pipeline once to create it)")
        raise store_error(url, doing, e) from None
    except BaseException:
        await db.close()
        raise
    return db


async def _migrate(db: psycopg.AsyncConnection[Any]) -> None:
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        await db.execute("CREATE TABLE IF NOT EXISTS migrations "
                         "(name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)")
        cursor = await db.execute("SELECT name FROM migrations")
        applied = {name for (name,) in await cursor.fetchall()}
    known = [name for name, _ in MIGRATIONS]
    unknown = sorted(applied - set(known))
    if unknown:
        raise StoreError(f"the store was made by a newer flow (migrations {', '.join(unknown)} "
                         "are unknown here); upgrade flow to use it")
    for name, statements in MIGRATIONS:
        if name in applied:
            continue
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            cursor = await db.execute("SELECT 1 FROM migrations WHERE name = %s", (name,))
            if await cursor.fetchone() is not None:
                continue  # another process applied it while this one waited
            for sql in statements():
                await db.execute(sql)
            await db.execute("INSERT INTO migrations VALUES (%s, now())", (name,))


class Reconnects:
    """A worker's connections to one store, made again after the server went away: each
    waits up to `RECONNECT_S` for it to come back (a server restarting). Once one has given
    up, the others give up too, at once: a worker with the store gone for good ends within
    that wait, not after one such wait for every statement it still has to run; a later
    statement still tries once, so a store back by then is used again."""

    def __init__(self, url: StoreURL, idle_s: float = IDLE_IN_TRANSACTION_S) -> None:
        self._url = url
        self._idle_s = idle_s
        self.lost: StoreError | None = None

    async def connect(self, error: Exception) -> psycopg.AsyncConnection[Any]:
        """A new connection after `error` broke the last; a `StoreError` naming `error`
        once the store has stayed away `RECONNECT_S`."""
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                db = await connect(self._url, migrate=False, idle_s=self._idle_s)
            except StoreError:
                if self.lost is not None:  # given up on, before or meanwhile: no wait
                    raise self.lost from None
                if time.monotonic() > deadline:
                    self.lost = store_error(self._url, "lost the connection to the store",
                                            error)
                    raise self.lost from None
                await asyncio.sleep(RECONNECT_WAIT_S)
                continue
            self.lost = None  # the store is back
            return db

    async def again(self, error: Exception, failing_since: float | None,
                    doing: str) -> psycopg.AsyncConnection[Any]:
        """A new connection to run a statement again after `error` ended the last: at once
        the first time (`failing_since` None), then after a pause; a `StoreError` once the
        statement has failed so since `failing_since` for `RECONNECT_S` (an error that comes
        on every connection: the server out of disk, a session ended each time)."""
        if failing_since is not None:
            if time.monotonic() - failing_since > RECONNECT_S:
                raise store_error(self._url, doing, error)
            await asyncio.sleep(RECONNECT_WAIT_S)
        return await self.connect(error)
