"""The SQLite store: WAL mode, written as results complete, one live run at a time.

Paid replies go to `responses` once and are never changed (triggers refuse it); what each
item made of one goes to `outputs`, one row per (stage, item), replaced when post steps or
the request change. Results go to a single writer task that commits whatever has arrived
since its last commit, so a received reply waits in memory only for the commit in progress
(a few milliseconds), never for a batch to fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from flow.errors import StoreError
from flow.records import STAGE, ItemRecord, Known, Settled, utc_now
from flow.store.lock import StoreLock
from flow.store.opening import connect_locked, connect_read_only
from flow.store.shards import SQLiteShards
from flow.store.sqlite_sql import (
    CRASHED_SQL,
    FINISH_RUN_SQL,
    HELD_SQL,
    ITEM_STAGES,
    MAX_VARIABLES,
    NEW_RUN_SQL,
    SEEN_TABLES,
    STAGE_ITEMS,
    UNSEEN,
    Statement,
    fetch_all,
    group_statements,
    insert_held,
    inserts,
    known_sql,
    reassign_payer,
    reconcile_sql,
    run_in_transaction,
    store_error,
)
from flow.store.sqlite_unchanged import (
    begin_rendering,
    end_rendering,
    forget,
    mark_seen,
    read_unchanged,
    see_unchanged,
)
from flow.store.views import refresh_browse_view
from flow.store.writer import GroupWriter

CHUNK = 5000


class SQLiteStore:
    """The store a run writes to; open with `await SQLiteStore.open(path)`, then `close()`."""

    def __init__(self, path: Path, db: aiosqlite.Connection, lock: StoreLock | None,
                 busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self._db = db
        self._lock = lock
        self._busy_timeout_s = busy_timeout_s
        self._writer = GroupWriter(self._commit, lambda e: self._error("cannot write results", e))
        self._transaction = asyncio.Lock()
        self._next_response_id = 1
        self.run_id = 0
        self.shards = SQLiteShards(self._query, self._write)

    @classmethod
    async def open(cls, path: Path, busy_timeout_s: float = 5.0) -> SQLiteStore:
        """Lock, migrate and connect to the store at `path`, to run a pipeline."""
        lock, db, next_response_id = await connect_locked(path, busy_timeout_s)
        store = cls(path, db, lock, busy_timeout_s)
        # one writer holds the lock, so it numbers the replies it adds itself
        store._next_response_id = next_response_id
        store._writer.start()
        return store

    @classmethod
    async def open_read_only(cls, path: Path) -> SQLiteStore:
        """Connect without locking or migrating, to look (a dry run, beside a live run, or
        on a read-only mount)."""
        return cls(path, await connect_read_only(path), None)

    async def start_run(self, pipeline: Path, origin: str, endpoint: str) -> int:
        """Record a new run; runs left `running` by a dead process become `crashed`, with
        what they paid for counted from the replies they stored."""
        cursor = await self._run_sql(CRASHED_SQL, (utc_now(),))
        crashed = [run_id for (run_id,) in await cursor.fetchall()]
        for run_id in crashed:
            await self._reconcile(run_id, None)
        cursor = await self._run_sql(NEW_RUN_SQL, (str(pipeline), origin, endpoint, os.getpid(),
                                                   utc_now()))
        self.run_id = cursor.lastrowid or 0
        return self.run_id

    async def finish_run(self, state: str, message: str | None, counts: dict[str, int],
                         stages: Sequence[str] = (STAGE,)) -> None:
        """Flush every pending result, then record the run's end; its spend is what it stored;
        `browse` is made again with the input's fields.

        After a failed write the end is still recorded, if the store takes it (and a write
        that fails here is raised once it is)."""
        failure: StoreError | None = None
        if self._writer.failure is None:
            try:
                await self.flush()
            except StoreError as e:
                failure = e
                state, message = "stopped", message or str(e)
        times = self._writer.times
        await self._run_sql(FINISH_RUN_SQL, (
            utc_now(), state, message, counts.get("items_total"), counts.get("items_done", 0),
            counts.get("items_failed", 0), counts.get("items_skipped", 0),
            times.groups, round(times.wait_mean_ms, 2), round(times.wait_max_ms, 2),
            self.run_id))
        await self._reconcile(self.run_id, counts.get("calls_made"))
        if failure is not None:
            raise failure
        # last: `browse` is made from the items, and nothing of the run's record waits on it
        async with self._transaction:
            try:
                await self._in_thread(refresh_browse_view, self._db._conn, stages)
            except sqlite3.Error as e:
                raise self._error("cannot make the browse view", e) from None

    async def _reconcile(self, run_id: int, calls_made: int | None) -> None:
        """A run's tokens and cost from the replies it stored; its attempts, when unknown,
        from what it left in the store."""
        params = (calls_made, run_id) if calls_made is not None else (run_id,)
        await self._run_sql(reconcile_sql(calls_made is not None), params)

    async def last_pipeline(self) -> str | None:
        """The pipeline file of the store's latest run, if it has run."""
        rows = await self._query("SELECT pipeline FROM runs ORDER BY id DESC LIMIT 1", ())
        return str(rows[0][0]) if rows else None

    async def store_id(self) -> str:
        """The store's own id (made when its schema was), naming it to the provider."""
        ((value,),) = await self._query("SELECT value FROM store_info WHERE key = 'id'", ())
        return str(value)

    async def origins(self) -> list[str]:
        """The origins the store's runs were made at."""
        return [str(origin) for (origin,) in
                await self._query("SELECT DISTINCT origin FROM runs", ())]

    async def failed_classes(self, stage: str) -> dict[str, int]:
        """How many failed items there are of each error class."""
        rows = await self._query("SELECT error_class, COUNT(*) FROM results WHERE stage=? AND "
                                 "status='failed' GROUP BY error_class", (stage,))
        return {str(name): int(count) for name, count in rows if name is not None}

    async def spent_usd(self, origin: str) -> float:
        """Dollars paid for every reply from endpoints of this origin, in every run."""
        rows = await self._query(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM responses WHERE origin=?", (origin,))
        return float(rows[0][0])

    async def known_items(self, stage: str, item_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Stored (row, request_key, origin, error_class, error, input, skipped, stopped_at)
        per item id, for those known (`ItemRecord.stored`)."""
        found: dict[str, tuple[Any, ...]] = {}
        for chunk in _chunks(item_ids, CHUNK):
            marks = ",".join("?" * len(chunk))
            rows = await self._query(
                f"SELECT item_id, row, request_key, origin, error_class, error, input, skipped, "
                f"stopped_at FROM items WHERE stage=? AND item_id IN ({marks})", (stage, *chunk))
            for item_id, *rest in rows:
                found[item_id] = tuple(rest)
        return found

    async def known(self, stage: str, origin: str, items: Sequence[tuple[str, str]],
                    with_output: bool = False) -> dict[str, Known]:
        """For each (item id, request key): its stored output and its request's latest reply;
        `with_output`: the output's JSON too (a later stage renders from it)."""
        found: dict[str, Known] = {}
        for chunk in _chunks(items, CHUNK):
            rows = await self._query(known_sql(len(chunk), with_output), (
                stage, origin, *(value for pair in chunk for value in pair)))
            for (item_id, key, post_key, status, error_class, response_id, bought, reply,
                 *output) in rows:
                found[item_id] = Known(key, post_key, status, error_class, response_id,
                                       bool(bought), reply, *output)
        return found

    async def reply_bodies(self, response_ids: Iterable[int]) -> dict[int, str]:
        """The stored body of each reply, to post-process it again without a call."""
        found: dict[int, str] = {}
        for chunk in _chunks(sorted(set(response_ids)), CHUNK):
            marks = ",".join("?" * len(chunk))
            for response_id, body in await self._query(
                    f"SELECT id, body FROM responses WHERE id IN ({marks})", chunk):
                found[response_id] = body
        return found

    async def stored_replies(self, origin: str, keys: Sequence[str]) -> dict[str, tuple[int, str]]:
        """The latest stored reply to each of `keys` at `origin`: its id and body."""
        found: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(sorted(set(keys)), CHUNK):
            marks = ",".join("?" * len(chunk))
            for key, response_id, body in await self._query(
                    f"SELECT request_key, id, body FROM responses WHERE origin = ? AND "
                    f"request_key IN ({marks}) ORDER BY id", (origin, *chunk)):
                found[key] = (response_id, body)
        return found

    async def save_items(self, stage: str, origin: str, items: Sequence[ItemRecord]) -> None:
        """Record where rows are and what they render to, before their calls are sent.

        An item whose request changes no longer carries the cost of the reply it paid for,
        and one whose request changes back may carry it again: in the same transaction, the
        replies of their outputs get a current payer.
        """
        if not items:
            return
        now = utc_now()
        used: list[int] = []
        for chunk in _chunks([item.item_id for item in items], CHUNK):
            marks = ",".join("?" * len(chunk))
            used.extend(reply for (reply,) in await self._query(
                f"SELECT DISTINCT response_id FROM outputs WHERE stage=? AND item_id IN "
                f"({marks}) AND response_id IS NOT NULL", (stage, *chunk)))
        statements = inserts(
            "INSERT INTO items (stage, item_id, row, input, request_key, origin, error_class, "
            "error, skipped, stopped_at, updated_at) VALUES",
            [(stage, item.item_id, item.row, item.input, item.request_key, origin,
              item.error_class, item.error, item.skipped, item.stopped_at, now)
             for item in items],
            " ON CONFLICT (stage, item_id) DO UPDATE SET row=excluded.row, "
            "input=excluded.input, request_key=excluded.request_key, origin=excluded.origin, "
            "error_class=excluded.error_class, error=excluded.error, "
            "skipped=excluded.skipped, stopped_at=excluded.stopped_at, "
            "updated_at=excluded.updated_at")
        statements += [reassign_payer(list(chunk)) for chunk in _chunks(used, CHUNK)]
        await self._write("cannot write items", statements)

    async def begin_seen_ids(self) -> None:
        """Start remembering the item ids this run has read (to refuse duplicates) and the
        rows held to be named at the input's end."""
        for sql in SEEN_TABLES:
            await self._run_sql(sql)

    async def hold(self, rows: Sequence[tuple[int, str, str | None, str | None]]) -> None:
        """Keep rows to be named at the input's end: (row, base of its id, error class, error)."""
        await self._write("cannot write", [insert_held(chunk)
                                           for chunk in _chunks(rows, MAX_VARIABLES // 4)])

    async def held(self, after_row: int,
                   limit: int) -> list[tuple[int, str, str | None, str | None]]:
        """The held rows after `after_row`, `limit` at most, in row order."""
        return [(int(row), str(base), error_class, error) for row, base, error_class, error in
                await self._query(HELD_SQL, (after_row, limit))]

    async def mark_seen(self, rows: Sequence[tuple[str, int]]) -> dict[str, int]:
        """Remember a batch of (item id, row); the first row of each id, where it has one."""
        return dict(await self._call("cannot write", mark_seen, rows))

    async def begin_rendering(self, stage: str, fingerprint: str) -> bool:
        """Whether every item stored at `stage` was keyed under `fingerprint` (so an unchanged
        row needs no rendering); if not, that claim is dropped before any item is saved, or
        made at once when the stage has no items yet."""
        return bool(await self._call("cannot write", begin_rendering, stage, fingerprint))

    async def end_rendering(self, stage: str, fingerprint: str) -> None:
        """Record that every item stored at `stage` was keyed under `fingerprint` (the whole
        input planned with it)."""
        await self._call("cannot write", end_rendering, stage, fingerprint)

    async def see_unchanged(self, stage: str, origin: str, post_key: str,
                            rows: Sequence[tuple[str, int, str | None]],
                            with_output: bool = False
                            ) -> tuple[dict[str, int], dict[str, str | None]]:
        """`mark_seen` for (item id, row, input) triples, in the same hop: the first row of
        each id, and of the rows with an input that are first with their id, those whose
        stored item is the same row, done from its current request with post steps
        `post_key`, each with its output (None unless `with_output`). Valid only while
        `begin_rendering` holds."""
        before, answer = await self._call("cannot write", see_unchanged, stage, origin,
                                          post_key, rows, with_output)
        return read_unchanged(rows, before, answer, with_output)

    async def forget_stages(self, stages: Sequence[str]) -> int:
        """Drop the items and outputs of stages the pipeline no longer has (replies stay,
        and one they paid for is credited to another item that uses it)."""
        if {stage for (stage,) in await self._query(ITEM_STAGES, ())} <= set(stages):
            return 0  # the usual case, found without reading every item
        marks = ",".join("?" * len(stages))
        return await self._forget(f"stage NOT IN ({marks})", list(stages))

    async def forget_unseen(self, stage: str, seen: int = 0) -> int:
        """Drop the items of rows this run did not read (gone from the input); replies stay,
        and a reply one of them paid for is credited to another item that uses it. `seen`:
        how many distinct items of the stage this run is known to have read; when the stage
        holds no more, none is gone, and none is looked up (a second a million)."""
        if seen and (await self._query(STAGE_ITEMS, [stage]))[0][0] <= seen:
            return 0
        return await self._forget(UNSEEN, [stage])

    async def _forget(self, where: str, params: list[Any]) -> int:
        """Drop the items and outputs `where` picks (`forget`); how many items went."""
        return int(await self._call("cannot write", forget, where, params))

    async def save(self, settled: Settled) -> None:
        """Commit a call's reply and outputs; returns once they are on disk."""
        await self._writer.save(settled)

    async def flush(self) -> None:
        """Wait until every queued result is committed."""
        await self._writer.flush()

    async def close(self) -> None:
        """Flush, stop the writer, checkpoint the WAL and release the lock."""
        try:
            if self._writer.failure is None:
                await self.flush()
        finally:
            await self._writer.stop()
            if self._lock is not None:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await self._db.close()
            if self._lock is not None:
                self._lock.release()

    async def _commit(self, group: list[Settled]) -> None:
        """Write one group in one transaction, numbering its replies."""
        statements, next_id = group_statements(group, self.run_id, self._next_response_id)
        async with self._transaction:
            await self._in_thread(run_in_transaction, self._db._conn, statements)
        self._next_response_id = next_id

    async def _call(self, doing: str, function: Callable[..., Any], *args: Any) -> Any:
        """`function(connection, *args)` on the connection's thread, under the transaction
        lock, in one hop; its result."""
        async with self._transaction:
            try:
                return await self._db._execute(  # type: ignore[no-untyped-call]
                    function, self._db._conn, *args)
            except sqlite3.Error as e:
                raise self._error(doing, e) from None

    async def _in_thread(self, function: Callable[..., object], *args: Any) -> None:
        """Run `function` on the connection's own thread: one hop for many statements."""
        await self._db._execute(function, *args)  # type: ignore[no-untyped-call]

    async def _run_sql(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        try:
            async with self._transaction:
                return await self._db.execute(sql, params)
        except (sqlite3.Error, ValueError, OverflowError) as e:
            raise self._error("cannot write", e) from None

    async def _write(self, doing: str, statements: list[Statement]) -> None:
        """Run `statements` in one transaction, on the connection's thread in one hop."""
        async with self._transaction:
            try:
                await self._in_thread(run_in_transaction, self._db._conn, statements)
            except (sqlite3.Error, ValueError, OverflowError) as e:
                raise self._error(doing, e) from None

    async def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows `sql` selects, in one hop to the connection's thread (a cursor of
        aiosqlite's takes three: execute, fetch, close)."""
        try:
            rows: list[Any] = await self._db._execute(  # type: ignore[no-untyped-call]
                fetch_all, self._db._conn, sql, params)
            return rows
        except sqlite3.Error as e:
            raise self._error("cannot read", e) from None

    def _error(self, doing: str, error: Exception) -> StoreError:
        if isinstance(error, StoreError):
            return error
        return store_error(self.path, doing, error, self._busy_timeout_s)


def _chunks(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]
