"""The checkpoint store: SQLite in WAL mode, written as results complete.

One live run owns a store at a time (an advisory lock on `<store>.lock`, released by the
kernel however the process dies). Results go to a single writer task that commits whatever
has arrived since its last commit, so a received response waits in memory only for the
commit in progress (a few milliseconds), never for a batch to fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiosqlite

from flow.errors import StoreError, StoreLockedError
from flow.migrations import apply_migrations, unknown_migrations

MAX_GROUP = 2000
MAX_VARIABLES = 32_000  # SQLite allows 32,766 bound values per statement since 3.32


_second: list[Any] = [-1, ""]


def utc_now() -> str:
    """The current time as ISO 8601 UTC with milliseconds (`2026-11-25T04:10:33.509Z`)."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        # formatted once a second: this runs several times per request
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


@dataclass(slots=True)
class AttemptRecord:
    """One HTTP attempt of a call."""

    number: int
    started_at: str
    latency_ms: float
    status_code: int | None
    outcome: str
    error: str | None = None
    wait_s: float | None = None


@dataclass(slots=True)
class CallRecord:
    """The final outcome of one request: what was sent, what came back, what it became."""

    request_key: str
    origin: str
    model: str
    request: dict[str, Any]
    status: str
    started_at: str
    finished_at: str
    response: str | None = None
    output: str | None = None
    post_key: str | None = None
    error_class: str | None = None
    error: str | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    attempt_log: list[AttemptRecord] = field(default_factory=list)
    request_json: str | None = None


@dataclass(slots=True)
class ItemRecord:
    """One input row as the store keeps it: where it is, what it renders to, or why it failed."""

    item_id: str
    row: int
    input: str | None
    request_key: str | None
    error_class: str | None = None
    error: str | None = None


@dataclass(slots=True)
class KnownCall:
    """What the store already holds for a request key."""

    status: str
    has_response: bool
    post_key: str | None
    error_class: str | None


@dataclass(slots=True)
class RunTotals:
    """Counters a run keeps up to date in its `runs` row."""

    items_total: int | None = None
    items_done: int = 0
    items_failed: int = 0
    items_skipped: int = 0
    calls_made: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    committed: int = 0
    commit_groups: int = 0
    commit_wait_total_ms: float = 0.0
    commit_wait_max_ms: float = 0.0

    @property
    def commit_wait_mean_ms(self) -> float:
        """Mean time a result waited in memory before it was on disk."""
        return self.commit_wait_total_ms / self.committed if self.committed else 0.0


class StoreLock:
    """An exclusive advisory lock on `<store>.lock`, holding the owner's pid."""

    def __init__(self, store_path: Path) -> None:
        self.path = store_path.with_name(store_path.name + ".lock")
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise `StoreLockedError` naming the process that holds it."""
        try:
            handle = self.path.open("a+")
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the lock file: {e.strerror or e}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise StoreLockedError(
                f"{self.path.with_suffix('')}: another flow run (pid {owner}) is using this "
                "store; wait for it to finish or stop it, then run again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Give the lock up (the kernel also does so when the process dies)."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def prepare_store(path: Path) -> None:
    """Create the store if needed and bring its schema up to date."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        raise store_error(path, "cannot open the store", e) from None
    try:
        db.execute("PRAGMA journal_mode=WAL")
        apply_migrations(db)
        newer = unknown_migrations(db)
        if newer:
            raise StoreError(f"{path}: written by a newer flow (migrations {', '.join(newer)}); "
                             "upgrade flow to use it")
    except sqlite3.DatabaseError as e:
        raise store_error(path, "cannot prepare the store", e) from None
    finally:
        db.close()


class Store:
    """The store a run writes to; open with `await Store.open(path)`, close with `close()`."""

    def __init__(self, path: Path, db: aiosqlite.Connection, lock: StoreLock | None) -> None:
        self.path = path
        self._db = db
        self._lock = lock
        self._pending: asyncio.Queue[tuple[CallRecord | None, asyncio.Future[None], float]] = (
            asyncio.Queue())
        self._writer: asyncio.Task[None] | None = None
        self._failure: StoreError | None = None
        self._transaction = asyncio.Lock()
        self.run_id = 0
        self.totals = RunTotals()

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Lock, migrate and connect to the store at `path`, to run a pipeline."""
        lock = StoreLock(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{path.parent}: cannot create the store's folder: "
                             f"{e.strerror or e}") from None
        lock.acquire()
        try:
            prepare_store(path)
            db = await aiosqlite.connect(path, isolation_level=None)
            # WAL + NORMAL: a commit survives the process being killed or crashing (it is in
            # the OS at once); FULL's fsync per commit held results ~35 ms here, not a few
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as e:
            lock.release()
            raise store_error(path, "cannot open the store", e) from None
        except BaseException:
            lock.release()
            raise
        store = cls(path, db, lock)
        store._writer = asyncio.create_task(store._write_forever())
        return store

    @classmethod
    async def open_read_only(cls, path: Path) -> Store:
        """Connect without locking or migrating, to look (a dry run, beside a live run)."""
        try:
            db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot read the store: {e}") from None
        return cls(path, db, None)

    async def start_run(self, pipeline: Path, origin: str, endpoint: str) -> int:
        """Record a new run; mark runs left `running` by a dead process as `crashed`."""
        await self._run_sql(
            "UPDATE runs SET state='crashed', finished_at=COALESCE(finished_at, ?) "
            "WHERE state='running'", (utc_now(),))
        cursor = await self._run_sql(
            "INSERT INTO runs (pipeline, origin, endpoint, pid, started_at, state) "
            "VALUES (?, ?, ?, ?, ?, 'running')",
            (str(pipeline), origin, endpoint, os.getpid(), utc_now()))
        self.run_id = cursor.lastrowid or 0
        return self.run_id

    async def finish_run(self, state: str, message: str | None = None) -> None:
        """Flush every pending result, then record the run's end and totals."""
        await self.flush()
        totals = self.totals
        await self._run_sql(
            "UPDATE runs SET finished_at=?, state=?, message=?, items_total=?, items_done=?, "
            "items_failed=?, items_skipped=?, calls_made=?, prompt_tokens=?, "
            "completion_tokens=?, cost_usd=?, commit_groups=?, commit_wait_mean_ms=?, "
            "commit_wait_max_ms=? WHERE id=?",
            (utc_now(), state, message, totals.items_total, totals.items_done,
             totals.items_failed, totals.items_skipped, totals.calls_made, totals.prompt_tokens,
             totals.completion_tokens, totals.cost_usd, totals.commit_groups,
             round(totals.commit_wait_mean_ms, 2), round(totals.commit_wait_max_ms, 2),
             self.run_id))

    async def known_items(self, stage: str, item_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Stored (row, request_key, origin, error_class, error) per item id, for those known."""
        found: dict[str, tuple[Any, ...]] = {}
        for chunk in _chunks(item_ids, 5000):
            marks = ",".join("?" * len(chunk))
            rows = await self._query(
                f"SELECT item_id, row, request_key, origin, error_class, error FROM items "
                f"WHERE stage=? AND item_id IN ({marks})", (stage, *chunk))
            for item_id, *rest in rows:
                found[item_id] = tuple(rest)
        return found

    async def known_calls(self, origin: str, keys: Iterable[str]) -> dict[str, KnownCall]:
        """What is stored for each of `keys` from endpoints of the given origin."""
        found: dict[str, KnownCall] = {}
        for chunk in _chunks(list(set(keys)), 5000):
            marks = ",".join("?" * len(chunk))
            rows = await self._query(
                f"SELECT request_key, status, response IS NOT NULL, post_key, error_class "
                f"FROM calls WHERE origin=? AND request_key IN ({marks})", (origin, *chunk))
            for key, status, has_response, post_key, error_class in rows:
                found[key] = KnownCall(status, bool(has_response), post_key, error_class)
        return found

    async def spent_usd(self, origin: str) -> float:
        """Dollars recorded for every call made to this endpoint, in every run."""
        rows = await self._query("SELECT COALESCE(SUM(cost_usd), 0) FROM calls WHERE origin=?",
                                 (origin,))
        return float(rows[0][0])

    async def stored_response(self, key: str, origin: str) -> tuple[str, dict[str, Any]] | None:
        """The raw response body and request of a stored call, to post-process it again."""
        rows = await self._query(
            "SELECT response, request FROM calls WHERE request_key=? AND origin=?", (key, origin))
        if not rows or rows[0][0] is None:
            return None
        return rows[0][0], json.loads(rows[0][1])

    async def save_items(self, stage: str, origin: str, items: Sequence[ItemRecord]) -> None:
        """Record where rows are and what they render to, before their calls are sent."""
        if not items:
            return
        now = utc_now()
        await self._run_many(
            "INSERT INTO items (stage, item_id, row, input, request_key, origin, error_class, "
            "error, updated_at) VALUES",
            [(stage, item.item_id, item.row, item.input, item.request_key, origin,
              item.error_class, item.error, now) for item in items],
            " ON CONFLICT (stage, item_id) DO UPDATE SET row=excluded.row, "
            "input=excluded.input, request_key=excluded.request_key, origin=excluded.origin, "
            "error_class=excluded.error_class, error=excluded.error, "
            "updated_at=excluded.updated_at")

    async def begin_seen_ids(self) -> None:
        """Start remembering the item ids this run has read, to refuse duplicates."""
        await self._run_sql("CREATE TEMP TABLE IF NOT EXISTS seen_ids "
                            "(item_id TEXT PRIMARY KEY, row INTEGER NOT NULL) WITHOUT ROWID")
        await self._run_sql("DELETE FROM seen_ids")

    async def mark_seen(self, rows: Sequence[tuple[str, int]]) -> dict[str, int]:
        """Remember a batch of (item id, row); the first row of each id, where it has one."""
        first: dict[str, int] = {}
        unique = []
        for item_id, row in rows:
            if item_id not in first:
                first[item_id] = row
                unique.append((item_id, row))
        taken: set[str] = set()
        size = MAX_VARIABLES // 2
        async with self._transaction:
            for start in range(0, len(unique), size):
                chunk = unique[start:start + size]
                sql = (f"INSERT INTO seen_ids VALUES {', '.join(['(?, ?)'] * len(chunk))} "
                       "ON CONFLICT DO NOTHING RETURNING item_id")
                try:
                    async with self._db.execute(sql, [v for pair in chunk for v in pair]) as cur:
                        taken.update(item_id for (item_id,) in await cur.fetchall())
                except sqlite3.Error as e:
                    raise store_error(self.path, "cannot write", e) from None
        clashes = [item_id for item_id, _ in unique if item_id not in taken]
        for names in _chunks(clashes, 900):
            marks = ",".join("?" * len(names))
            for item_id, row in await self._query(
                    f"SELECT item_id, row FROM seen_ids WHERE item_id IN ({marks})", names):
                first[item_id] = row
        return first

    async def forget_unseen(self, stage: str) -> int:
        """Drop the items of rows this run did not read (gone from the input); calls stay."""
        cursor = await self._run_sql(
            "DELETE FROM items WHERE stage=? AND item_id NOT IN (SELECT item_id FROM seen_ids)",
            (stage,))
        return max(cursor.rowcount, 0)

    async def save_call(self, record: CallRecord) -> None:
        """Commit a finished call; returns once it is on disk (grouped with its neighbours)."""
        if self._failure is not None:
            raise self._failure
        done = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((record, done, time.monotonic()))
        await done
        if self._failure is not None:
            raise self._failure

    async def flush(self) -> None:
        """Wait until every queued result is committed."""
        if self._writer is None or self._writer.done():
            if self._failure is not None:
                raise self._failure
            return
        done = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((None, done, time.monotonic()))
        await done
        if self._failure is not None:
            raise self._failure

    async def close(self) -> None:
        """Flush, stop the writer, checkpoint the WAL and release the lock."""
        try:
            if self._failure is None:
                await self.flush()
        finally:
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
            if self._lock is not None:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await self._db.close()
            if self._lock is not None:
                self._lock.release()

    async def _write_forever(self) -> None:
        """Commit whatever has arrived since the last commit, in one transaction."""
        while True:
            group = [await self._pending.get()]
            while len(group) < MAX_GROUP and not self._pending.empty():
                group.append(self._pending.get_nowait())
            records = [record for record, _, _ in group if record is not None]
            if records and self._failure is None:
                try:
                    await self._commit(records)
                except sqlite3.Error as e:
                    self._failure = store_error(self.path, "cannot write results", e)
                self._time_commit(group)
            for _, waiter, _ in group:
                if not waiter.done():
                    waiter.set_result(None)

    def _time_commit(self, group: list[tuple[CallRecord | None, Any, float]]) -> None:
        """How long results waited in memory, from arrival to being on disk."""
        now = time.monotonic()
        totals = self.totals
        totals.commit_groups += 1
        for record, _, queued in group:
            if record is not None:
                wait_ms = (now - queued) * 1000
                totals.commit_wait_max_ms = max(totals.commit_wait_max_ms, wait_ms)
                totals.commit_wait_total_ms += wait_ms
                totals.committed += 1

    async def _commit(self, records: list[CallRecord]) -> None:
        calls = [(r.request_key, r.origin, r.model,
                  r.request_json or json.dumps(r.request, ensure_ascii=False),
                  r.response, r.output, r.post_key, r.status, r.error_class, r.error, r.attempts,
                  r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.cost_usd, r.latency_ms,
                  r.started_at, r.finished_at, self.run_id) for r in records]
        # a call that succeeded at its first attempt is all in its `calls` row; writing that
        # attempt again cost a tenth of the throughput (the GIL, while binding its row)
        attempts = [(r.request_key, r.origin, self.run_id, a.number, a.started_at, a.latency_ms,
                     a.status_code, a.outcome, a.error, a.wait_s)
                    for r in records if r.status != "done" or len(r.attempt_log) > 1
                    for a in r.attempt_log]
        calls_sql = ("INSERT OR REPLACE INTO calls (request_key, origin, model, request, "
                     "response, output, post_key, status, error_class, error, attempts, "
                     "prompt_tokens, completion_tokens, cached_tokens, cost_usd, latency_ms, "
                     "started_at, finished_at, run_id) VALUES")
        async with self._transaction:
            if not attempts and len(calls) <= MAX_VARIABLES // len(calls[0]):
                # one statement is one transaction: a single round trip to the writer thread,
                # where BEGIN, INSERT, COMMIT took three (groups are small: 2-3 results)
                await self._insert(calls_sql, calls)
                return
            await self._db.execute("BEGIN")
            try:
                await self._insert(calls_sql, calls)
                await self._insert(
                    "INSERT INTO attempts (request_key, origin, run_id, number, started_at, "
                    "latency_ms, status_code, outcome, error, wait_s) VALUES", attempts)
                await self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                raise

    async def _run_sql(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        try:
            async with self._transaction:
                return await self._db.execute(sql, params)
        except sqlite3.Error as e:
            raise store_error(self.path, "cannot write", e) from None

    async def _insert(self, head: str, rows: list[tuple[Any, ...]], tail: str = "") -> None:
        """Insert many rows with one statement per chunk.

        `executemany` binds and steps row by row, taking and dropping the GIL twice a row
        against a busy event loop; one multi-row VALUES is bound at once and stepped once.
        """
        if not rows:
            return
        width = len(rows[0])
        size = max(1, MAX_VARIABLES // width)
        marks = "(" + ", ".join("?" * width) + ")"
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            await self._db.execute(f"{head} {', '.join([marks] * len(chunk))}{tail}",
                                   [value for row in chunk for value in row])

    async def _run_many(self, head: str, rows: list[tuple[Any, ...]], tail: str = "") -> None:
        async with self._transaction:
            try:
                await self._db.execute("BEGIN")
                await self._insert(head, rows, tail)
                await self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                raise store_error(self.path, "cannot write items", e) from None

    async def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            async with self._db.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as e:
            raise store_error(self.path, "cannot read", e) from None


def store_error(path: Path, doing: str, error: sqlite3.Error) -> StoreError:
    """A `StoreError` that says what happened to the store in words a person can act on."""
    text = str(error)
    if "locked" in text or "busy" in text:
        hint = ("another program (a sqlite3 shell, Datasette, a backup) has held a write lock "
                "on it for more than 5 s; close it and run again")
    elif "full" in text or "disk I/O error" in text:
        hint = ("the disk is full or refused the write; free some space (or check the disk) "
                "and run again")
    elif "readonly" in text or "read-only" in text:
        hint = "the store or its folder is read-only; make it writable or move `store:`"
    elif "malformed" in text or "not a database" in text:
        hint = "the file is not a flow store, or it is damaged"
    else:
        hint = text
    return StoreError(f"{path}: {doing}: {hint}; everything committed before is safe")


def _chunks(values: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]
