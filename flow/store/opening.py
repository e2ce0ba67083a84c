"""Opening the SQLite store: locked, migrated and connected for a run, or read-only."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import aiosqlite

from flow.errors import StoreError
from flow.open_files import is_out_of_files, out_of_files_hint
from flow.store.lock import StoreLock
from flow.store.migrations import prepare_store
from flow.store.read_only import read_only_uri
from flow.store.sqlite_sql import store_error


async def connect_locked(path: Path,
                         busy_timeout_s: float) -> tuple[StoreLock, aiosqlite.Connection, int]:
    """The store's lock, taken; its schema, brought up to date; a connection to it; and the
    id its next reply takes."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot create the store's folder: "
                         f"{e.strerror or e}") from None
    lock = StoreLock(path)
    try:
        lock.acquire()
    except StoreError as e:
        if is_out_of_files(e):
            raise StoreError(f"{lock.store_path}: cannot open the store: "
                             f"{out_of_files_hint()}") from None
        raise
    db: aiosqlite.Connection | None = None
    try:
        # SQLite opens the very file that is locked, even if a link is changed meanwhile
        prepare_store(lock.database, busy_timeout_s)
        db = await aiosqlite.connect(lock.database, isolation_level=None)
        # WAL + NORMAL: a commit survives the process being killed or crashing (it is in
        # the OS at once); FULL's fsync per commit held results ~35 ms here, not a few
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        async with db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM responses") as cursor:
            row = await cursor.fetchone()
    except BaseException as e:
        # the connection first: releasing the lock closes a descriptor of the database
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                await db.close()
        lock.release()
        if isinstance(e, sqlite3.Error):
            raise store_error(path, "cannot open the store", e, busy_timeout_s) from None
        raise
    return lock, db, int(row[0]) if row else 1


async def connect_read_only(path: Path) -> aiosqlite.Connection:
    """A connection that never writes (nor migrates, nor locks)."""
    uri = read_only_uri(path)
    db: aiosqlite.Connection | None = None
    try:
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        await db.execute("SELECT 1 FROM outputs LIMIT 1")
    except sqlite3.Error as e:
        if db is not None:
            await db.close()  # its thread would keep the process alive
        raise StoreError(f"{path}: cannot read the store (run the pipeline once to "
                         f"upgrade it): {e}") from None
    return db
