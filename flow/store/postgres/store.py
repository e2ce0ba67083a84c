"""The PostgreSQL store: the `Store` protocol on a server that many workers share.

The same tables and the same behaviour as `SQLiteStore`; results are committed in groups by
the same `GroupWriter`, with reply ids from the `responses` sequence. A result a worker
computed under a lease (`Settled.lease`) is fenced in its commit: its outputs are written
only if the lease is still that worker's; otherwise its paid reply is kept as an attempt
and nothing else changes (`Settled.rejected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flow.config.store_url import StoreURL
from flow.errors import StoreError, StoreLockedError
from flow.records import STAGE, ItemRecord, Known, Settled, utc_now
from flow.store.postgres import sql as q
from flow.store.postgres.browse import browse_sql
from flow.store.postgres.connect import IDLE_IN_TRANSACTION_S, Reconnects, connect
from flow.store.postgres.group import GroupCommits
from flow.store.postgres.queue import WorkQueue
from flow.store.shards import SQLiteShards
from flow.store.sqlite_sql import FINISH_RUN_SQL, reconcile_sql
from flow.store.views import SAMPLE_INPUTS_SQL, SAMPLE_ROWS, field_columns, fields_of
from flow.store.writer import GroupWriter

if TYPE_CHECKING:
    import psycopg

CHUNK = 5000
PLAN_LOCK_WAIT_S = 10.0  # how long a planner waits for the store lock before it is refused
STALE_S = 60  # a run whose worker has not beaten its heart for this long has crashed


class PostgresStore:
    """A run's store on PostgreSQL; open with `await PostgresStore.open(url)`, then `close()`."""

    def __init__(self, url: StoreURL, db: psycopg.AsyncConnection[Any], worker: str,
                 idle_s: float = IDLE_IN_TRANSACTION_S) -> None:
        self.path = url
        self.worker = worker
        self._db = db
        self._reconnects = Reconnects(url, idle_s)
        # the group writer's own connection
        self._commits = GroupCommits(url, idle_s, self._reconnects)
        self._transaction = asyncio.Lock()
        self._writer = GroupWriter(self._commit, lambda e: self._error("cannot write results", e))
        self.run_id = 0
        self.shards = SQLiteShards(self._query, self._write)
        self.queue = WorkQueue(self._query, worker)
        # a worker reconnects after losing the connection; a planner (whose session holds
        # what it has read) stops, and planning again is safe
        self.worker_session = False
        self._locked = False

    @classmethod
    async def open(cls, url: StoreURL, exclusive: bool = False,
                   idle_s: float = IDLE_IN_TRANSACTION_S) -> PostgresStore:
        """Connect and migrate; `exclusive`: as the one planner (a second one is refused);
        `idle_s`: a session idle this long inside a transaction is ended by the server."""
        db = await connect(url, idle_s=idle_s)
        store = cls(url, db, f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(8)}",
                    idle_s)
        if exclusive:
            # a planner killed a moment ago holds the lock until the server notices that its
            # session is gone (after the statement it was running): it is waited for a while
            waited = 0.0
            while not (taken := (await store._query("SELECT pg_try_advisory_lock(?)",
                                                    (q.STORE_LOCK,)))[0][0]):
                if waited >= PLAN_LOCK_WAIT_S:
                    break
                await asyncio.sleep(0.1)
                waited += 0.1
            if not taken:
                await db.close()
                raise StoreLockedError(
                    f"{url}: another `flow plan` or `flow run` is planning this store now; "
                    "wait for it to end (workers may run beside it)")
            store._locked = True
        store._writer.start()
        return store

    @classmethod
    async def open_read_only(cls, url: StoreURL) -> PostgresStore:
        """Connect without migrating, to look (a dry run)."""
        return cls(url, await connect(url, migrate=False), "reader")

    async def start_run(self, pipeline: Path, origin: str, endpoint: str) -> int:
        """Record a new run; runs whose worker stopped beating its heart become `crashed`."""
        crashed = await self._query(
            "UPDATE runs SET state = 'crashed', finished_at = COALESCE(finished_at, ?) WHERE "
            "state = 'running' AND (heartbeat_at IS NULL OR heartbeat_at < now() - "
            f"interval '{STALE_S} seconds') RETURNING id", (utc_now(),), write=True)
        for (run_id,) in crashed:
            await self._query(q.pyformat(reconcile_sql(False)), (run_id,), write=True, raw=True)
        ((self.run_id,),) = await self._query(
            "INSERT INTO runs (pipeline, origin, endpoint, pid, started_at, state, worker, "
            "heartbeat_at) VALUES (?, ?, ?, ?, ?, 'running', ?, now()) RETURNING id",
            (str(pipeline), origin, endpoint, os.getpid(), utc_now(), self.worker), write=True)
        self.queue.run_id = self.run_id
        return self.run_id

    async def finish_run(self, state: str, message: str | None, counts: dict[str, int],
                         stages: Sequence[str] = (STAGE,)) -> None:
        """Flush every pending result, then record the run's end and make `browse` again."""
        failure: StoreError | None = None
        if self._writer.failure is None:
            try:
                await self.flush()
            except StoreError as e:
                failure = e
                state, message = "stopped", message or str(e)
        times = self._writer.times
        await self._query(FINISH_RUN_SQL, (
            utc_now(), state, message, counts.get("items_total"), counts.get("items_done", 0),
            counts.get("items_failed", 0), counts.get("items_skipped", 0),
            times.groups, round(times.wait_mean_ms, 2), round(times.wait_max_ms, 2),
            self.run_id), write=True)
        calls = counts.get("calls_made")
        await self._query(q.pyformat(reconcile_sql(calls is not None)),
                          (calls, self.run_id) if calls is not None else (self.run_id,),
                          write=True, raw=True)
        if failure is not None:
            raise failure
        await self._refresh_browse(stages)

    async def _refresh_browse(self, stages: Sequence[str]) -> None:
        rows = await self._query(SAMPLE_INPUTS_SQL, (stages[0], SAMPLE_ROWS))
        fields = field_columns(fields_of(rows), stages[:-1])
        async with self._transaction, self._db.transaction():
            await self._db.execute("DROP VIEW IF EXISTS browse")
            await self._db.execute(browse_sql(fields, stages))

    async def analyze(self) -> None:
        """Fresh statistics once a plan has filled the queue, so claims go through their
        index from the first (the planner takes a just-filled table for an empty one)."""
        await self._query("ANALYZE work, items", (), write=True, raw=True)

    async def last_pipeline(self) -> str | None:
        """The pipeline file of the store's latest run, if it has run."""
        rows = await self._query("SELECT pipeline FROM runs ORDER BY id DESC LIMIT 1", ())
        return str(rows[0][0]) if rows else None

    async def store_id(self) -> str:
        """The store's own id (made when its schema was), naming it to the provider."""
        ((value,),) = await self._query("SELECT value FROM store_info WHERE key = 'id'", ())
        return str(value)

    async def info(self, key: str) -> str | None:
        """A value of `store_info`, if set."""
        rows = await self._query("SELECT value FROM store_info WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_info(self, key: str, value: str) -> None:
        """Set a value of `store_info`."""
        await self._query("INSERT INTO store_info VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                          "SET value = EXCLUDED.value", (key, value), write=True)

    async def origins(self) -> list[str]:
        """The origins the store's runs were made at."""
        return [str(o) for (o,) in await self._query("SELECT DISTINCT origin FROM runs", ())]

    async def failed_classes(self, stage: str) -> dict[str, int]:
        """How many failed items there are of each error class."""
        rows = await self._query("SELECT error_class, COUNT(*) FROM results WHERE stage = ? "
                                 "AND status = 'failed' GROUP BY error_class", (stage,))
        return {str(name): int(count) for name, count in rows if name is not None}

    async def spent_usd(self, origin: str) -> float:
        """Dollars paid for every reply from endpoints of this origin, by every worker."""
        rows = await self._query("SELECT COALESCE(SUM(cost_usd), 0) FROM responses "
                                 "WHERE origin = ?", (origin,))
        return float(rows[0][0])

    async def known_items(self, stage: str, item_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Stored (row, request_key, origin, error_class, error, input, skipped, stopped_at)
        per item id, for those known (`ItemRecord.stored`)."""
        found: dict[str, tuple[Any, ...]] = {}
        for chunk in _chunks(item_ids, CHUNK):
            for item_id, row, key, origin, error_class, error, text, skipped, stopped in (
                    await self._query(q.KNOWN_ITEMS_SQL, (stage, list(chunk)), raw=True)):
                found[item_id] = (row, key, origin, error_class, error, text, skipped, stopped)
        return found

    async def known(self, stage: str, origin: str, items: Sequence[tuple[str, str]],
                    with_output: bool = False) -> dict[str, Known]:
        """For each (item id, request key): its stored output and its request's latest reply."""
        found: dict[str, Known] = {}
        sql = q.known_sql(with_output)
        for chunk in _chunks(items, CHUNK):
            params = {"ids": [i for i, _ in chunk], "keys": [k for _, k in chunk],
                      "stage": stage, "origin": origin}
            for (item_id, key, post_key, status, error_class, response_id, bought, reply,
                 *output) in await self._query(sql, params, raw=True):
                found[item_id] = Known(key, post_key, status, error_class, response_id,
                                       bool(bought), reply, *output)
        return found

    async def reply_bodies(self, response_ids: Iterable[int]) -> dict[int, str]:
        """The stored body of each reply, to post-process it again without a call."""
        found: dict[int, str] = {}
        for chunk in _chunks(sorted(set(response_ids)), CHUNK):
            for response_id, body in await self._query(
                    "SELECT id, body FROM responses WHERE id = ANY(%s)", (list(chunk),),
                    raw=True):
                found[int(response_id)] = body
        return found

    async def stored_replies(self, origin: str, keys: Sequence[str]) -> dict[str, tuple[int, str]]:
        """The latest stored reply to each of `keys` at `origin`: its id and body."""
        found: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(sorted(set(keys)), CHUNK):
            for key, response_id, body in await self._query(
                    "SELECT request_key, id, body FROM responses WHERE origin = %s AND "
                    "request_key = ANY(%s) ORDER BY id", (origin, list(chunk)), raw=True):
                found[key] = (int(response_id), body)
        return found

    async def save_items(self, stage: str, origin: str, items: Sequence[ItemRecord]) -> None:
        """Record where rows are and what they render to; replies whose paying item moved get
        a current payer in the same transaction."""
        if not items:
            return
        now = utc_now()
        used: list[int] = []
        for chunk in _chunks([item.item_id for item in items], CHUNK):
            used.extend(r for (r,) in await self._query(q.USED_REPLIES_SQL,
                                                        (stage, list(chunk)), raw=True))
        rows = [(stage, i.item_id, i.row, i.input, i.request_key, origin, i.error_class,
                 i.error, int(i.skipped), i.stopped_at, now) for i in items]
        writes: list[tuple[str, list[Any]]] = [
            (q.ITEMS_UPSERT, [q.columns_of(rows, q.ITEM_COLUMNS, keyed=True)])]
        if used:
            writes.append((q.REASSIGN_PAYER, [(used,)]))
        await self._many("cannot write items", writes)

    async def begin_seen_ids(self) -> None:
        """Start remembering the item ids this run has read and the rows held."""
        for sql in q.SEEN_TABLES:
            await self._query(sql, (), write=True, raw=True)

    async def hold(self, rows: Sequence[tuple[int, str, str | None, str | None]]) -> None:
        """Keep rows to be named at the input's end: (row, base of its id, error class, error)."""
        await self._many("cannot write", [(q.INSERT_HELD_SQL, list(rows))])

    async def held(self, after_row: int,
                   limit: int) -> list[tuple[int, str, str | None, str | None]]:
        """The held rows after `after_row`, `limit` at most, in row order."""
        return [(int(r), str(b), c, e) for r, b, c, e in
                await self._query(q.HELD_SQL, (after_row, limit), raw=True)]

    async def mark_seen(self, rows: Sequence[tuple[str, int]]) -> dict[str, int]:
        """Remember a batch of (item id, row); the first row of each id, where it has one."""
        first: dict[str, int] = {}
        for item_id, row in rows:
            first.setdefault(item_id, row)
        ids, numbers = list(first), list(first.values())
        taken = {i for (i,) in await self._query(q.INSERT_SEEN_SQL, (ids, numbers), write=True,
                                                 raw=True)}
        clashes = [item_id for item_id in ids if item_id not in taken]
        if clashes:
            for item_id, row in await self._query(q.SEEN_ROWS_SQL, (clashes,), raw=True):
                first[item_id] = row
        return first

    async def forget_stages(self, stages: Sequence[str]) -> int:
        """Drop the items and outputs of stages the pipeline no longer has."""
        return await self._forget(q.gone_stages, [list(stages)])

    async def begin_rendering(self, stage: str, fingerprint: str) -> bool:
        """Never: every row is rendered and planned (no render fingerprint is kept here)."""
        return False

    async def end_rendering(self, stage: str, fingerprint: str) -> None:
        """Nothing to record (see `begin_rendering`)."""

    async def see_unchanged(self, stage: str, origin: str, post_key: str,
                            rows: Sequence[tuple[str, int, str | None]],
                            with_output: bool = False
                            ) -> tuple[dict[str, int], dict[str, str | None]]:
        """`mark_seen`, and nothing done and unchanged (`begin_rendering` never holds)."""
        return await self.mark_seen([(item_id, row) for item_id, row, _ in rows]), {}

    async def forget_unseen(self, stage: str, seen: int = 0) -> int:
        """Drop the items of rows this run did not read (gone from the input); `seen` is
        never more than 0 here (no row is skipped unrendered)."""
        return await self._forget(q.unseen, [stage])

    async def _forget(self, where: Any, params: list[Any]) -> int:
        ((count,),) = await self._query(f"SELECT COUNT(*) FROM items WHERE {where('items')}",
                                        params, raw=True)
        if not count:
            return 0
        gone = [r for (r,) in await self._query(
            f"SELECT DISTINCT response_id FROM outputs WHERE {where('outputs')} AND bought <> 0",
            params, raw=True)]
        writes: list[tuple[str, list[Any]]] = [
            (f"DELETE FROM outputs WHERE {where('outputs')}", [params]),
            (f"DELETE FROM items WHERE {where('items')}", [params])]
        if gone:
            writes.append((q.REASSIGN_PAYER, [(gone,)]))
        await self._many("cannot write", writes)
        return int(count)

    async def save(self, settled: Settled) -> None:
        """Commit a call's reply and outputs; returns once they are on the server."""
        await self._writer.save(settled)

    async def flush(self) -> None:
        """Wait until every queued result is committed."""
        await self._writer.flush()

    async def close(self) -> None:
        """Flush, stop the writer and disconnect (which releases the planner's lock)."""
        try:
            if self._writer.failure is None:
                await self.flush()
        finally:
            await self._writer.stop()
            await self._commits.close()
            await self._db.close()

    async def _commit(self, group: list[Settled]) -> None:
        await self._commits.write(group, self.run_id, self.worker_session)

    async def _many(self, doing: str, writes: list[tuple[str, list[Any]]]) -> None:
        """Run each (statement, rows) with `executemany`, all in one transaction."""
        import psycopg

        async with self._transaction:
            try:
                async with self._db.transaction(), self._db.cursor() as cur:
                    for sql, values in writes:
                        await cur.executemany(sql, values)
            except psycopg.Error as e:
                raise self._error(doing, e) from None

    @property
    def rejected(self) -> int:
        """Results whose lease another worker had taken: kept as attempts, nothing more."""
        return self._commits.rejected

    @property
    def connection(self) -> object:
        """The connection statements run on now (a worker's is made again after a loss)."""
        return self._db

    @contextlib.asynccontextmanager
    async def transaction(self, doing: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """One transaction on the store's connection, for statements that read and decide
        between writes (a batch worker cutting a shard from the queue)."""
        import psycopg

        async with self._transaction:
            try:
                async with self._db.transaction():
                    yield self._db
            except psycopg.Error as e:
                raise self._error(doing, e) from None

    async def _write(self, doing: str, statements: list[tuple[str, list[Any]]]) -> None:
        """SQLite-style statements (`?`), run in one transaction (the batch book's)."""
        await self._many(doing, [(q.pyformat(sql), [params]) for sql, params in statements])

    async def _query(self, sql: str, params: Any, write: bool = False,
                     raw: bool = False) -> list[Any]:
        """Rows of `sql` (`?` placeholders unless `raw`: psycopg's own)."""
        import psycopg

        text = sql if raw else q.pyformat(sql)
        failing_since: float | None = None
        async with self._transaction:
            while True:
                try:
                    cursor = await self._db.execute(text, params)
                    return list(await cursor.fetchall()) if cursor.description else []
                except psycopg.Error as e:
                    if not self.worker_session or not (self._db.broken or self._db.closed):
                        raise self._error("cannot write" if write else "cannot read",
                                          e) from None
                    # a worker's statements stand alone: taken again on a new connection,
                    # for RECONNECT_S at most (a statement that ends its session each time)
                    self._db = await self._reconnects.again(
                        e, failing_since, "cannot write" if write else "cannot read")
                    failing_since = failing_since or time.monotonic()

    def _error(self, doing: str, error: Exception) -> StoreError:
        return q.store_error(self.path, doing, error)


def _chunks(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]
