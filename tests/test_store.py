"""The checkpoint store: migrations, the run lock, commits."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flow.errors import StoreError, StoreLockedError
from flow.records import ItemRecord, OutputRecord, ResponseRecord, Settled, Usage, utc_now
from flow.store.lock import StoreLock
from flow.store.migrations import MIGRATIONS, prepare_store
from flow.store.sqlite import SQLiteStore


def settled(key: str, item_id: str, cost: float = 0.25) -> Settled:
    """A paid reply to `key`, bought for `item_id`."""
    now = utc_now()
    response = ResponseRecord(key, "test", "m", '{"model":"m"}', "{}", Usage(10, 2), cost, 1,
                              5.0, now, now)
    output = OutputRecord(item_id, key, "done", "post", '"x"', bought=True, attempts=1)
    return Settled("call", "test", key, now, response, [], [output])


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
         "import sys, time; from pathlib import Path; from flow.store.lock import StoreLock; "
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
    assert path.with_name("flow.db.pid").read_text() == str(os.getpid())
    lock.release()


async def test_saved_results_are_committed_before_save_returns(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    store = await SQLiteStore.open(path)
    try:
        await store.start_run(Path("p.yaml"), "test", "http://x")
        await store.save_items("call", "test", [ItemRecord("a", 1, "{}", "k1")])
        await store.save(settled("k1", "a"))
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT status, cost_usd FROM results").fetchall() == [
                ("done", 0.25)]
        known = await store.known("call", "test", [("a", "k1"), ("b", "k2")])
        assert known["a"].status == "done" and known["a"].reply_id is not None
        assert known["b"].output_key is None and known["b"].reply_id is None
        other = await store.known("call", "other-origin", [("a", "k1")])
        assert other["a"].output_key is None and other["a"].reply_id is None
    finally:
        await store.close()


async def test_any_failure_to_commit_stops_the_writer_clearly_never_a_hang(
        tmp_path: Path) -> None:
    # half a character is no sqlite3.Error: the writer used to die on it, and the run hung
    path = tmp_path / "flow.db"
    store = await SQLiteStore.open(path)
    try:
        await store.start_run(Path("p.yaml"), "test", "http://x")
        await store.save_items("call", "test", [ItemRecord("a", 1, "{}", "k1"),
                                                ItemRecord("b", 2, "{}", "k2")])
        await store.save(settled("k1", "a"))
        bad = settled("k2", "b")
        bad.outputs[0].output = '"half \ud83d"'
        for _ in range(2):  # the failure, then every later caller
            with pytest.raises(StoreError, match="cannot write results"):
                await asyncio.wait_for(store.save(bad), 10)
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT item_id, status FROM results").fetchall() == [
                ("a", "done"), ("b", "pending")]
    finally:
        await store.close()


async def test_paid_replies_are_never_changed_or_removed(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    store = await SQLiteStore.open(path)
    try:
        await store.start_run(Path("p.yaml"), "test", "http://x")
        await store.save(settled("k1", "a"))
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        for sql in ("UPDATE responses SET cost_usd = 0", "DELETE FROM responses",
                    "INSERT OR REPLACE INTO responses SELECT * FROM responses"):
            with pytest.raises(sqlite3.IntegrityError, match="paid for"):
                db.execute(sql)
        assert db.execute("SELECT cost_usd FROM responses").fetchall() == [(0.25,)]


async def test_a_run_left_running_is_marked_crashed_with_what_it_paid(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    store = await SQLiteStore.open(path)
    await store.start_run(Path("p.yaml"), "test", "http://x")
    await store.save(settled("k1", "a", cost=0.5))
    await store.close()  # as a killed run leaves it: `running`, its totals never written
    store = await SQLiteStore.open(path)
    await store.start_run(Path("p.yaml"), "test", "http://x")
    await store.finish_run("finished", None, {})
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT state, cost_usd, prompt_tokens, calls_made FROM runs "
                          "ORDER BY id").fetchall() == [("crashed", 0.5, 10, 1),
                                                        ("finished", 0.0, 0, 0)]


async def test_mark_seen_reports_first_rows(tmp_path: Path) -> None:
    store = await SQLiteStore.open(tmp_path / "flow.db")
    try:
        await store.begin_seen_ids()
        assert await store.mark_seen([("a", 1), ("b", 2), ("a", 3)]) == {"a": 1, "b": 2}
        assert (await store.mark_seen([("b", 9), ("c", 10)])) == {"b": 2, "c": 10}
    finally:
        await store.close()
