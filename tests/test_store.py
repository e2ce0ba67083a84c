"""The checkpoint store: migrations, the run lock, commits."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flow.errors import StoreError, StoreLockedError
from flow.migrations import MIGRATIONS
from flow.store import CallRecord, ItemRecord, Store, StoreLock, prepare_store, utc_now


def record(key: str, status: str = "done") -> CallRecord:
    now = utc_now()
    return CallRecord(request_key=key, origin="test", model="m", request={"model": "m"},
                      status=status, started_at=now, finished_at=now, response="{}",
                      output='"x"', attempts=1)


def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    prepare_store(path)
    prepare_store(path)
    with sqlite3.connect(path) as db:
        names = [name for (name,) in db.execute("SELECT name FROM migrations")]
        assert names == [name for name, _ in MIGRATIONS]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_store_from_a_newer_flow_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    prepare_store(path)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO migrations VALUES ('m999_future', 'now')")
    with pytest.raises(StoreError, match="newer flow"):
        prepare_store(path)


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    path.write_text("this is not sqlite" * 100)
    with pytest.raises(StoreError, match="flow.db"):
        prepare_store(path)


def test_second_lock_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from flow.store import StoreLock; "
         f"lock = StoreLock(Path({str(path)!r})); lock.acquire(); print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            StoreLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = StoreLock(path)
    lock.acquire()
    assert path.with_name("flow.db.lock").read_text() == str(os.getpid())
    lock.release()


async def test_saved_calls_are_committed_before_save_returns(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    store = await Store.open(path)
    try:
        await store.start_run(Path("p.yaml"), "test", "http://x")
        await store.save_items("call", "test", [ItemRecord("a", 1, "{}", "k1")])
        await store.save_call(record("k1"))
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT status FROM results").fetchall() == [("done",)]
        known = await store.known_calls("test", ["k1", "k2"])
        assert set(known) == {"k1"} and known["k1"].status == "done"
        assert await store.known_calls("other-origin", ["k1"]) == {}
    finally:
        await store.close()


async def test_a_run_left_running_is_marked_crashed(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    store = await Store.open(path)
    await store.start_run(Path("p.yaml"), "test", "http://x")
    await store.close()
    store = await Store.open(path)
    await store.start_run(Path("p.yaml"), "test", "http://x")
    await store.finish_run("finished")
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT state FROM runs ORDER BY id").fetchall() == [
            ("crashed",), ("finished",)]


async def test_mark_seen_reports_first_rows(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "flow.db")
    try:
        await store.begin_seen_ids()
        assert await store.mark_seen([("a", 1), ("b", 2), ("a", 3)]) == {"a": 1, "b": 2}
        assert (await store.mark_seen([("b", 9), ("c", 10)])) == {"b": 2, "c": 10}
    finally:
        await store.close()
