"""The one-run-per-store lock: one lock per database file, whatever path reaches it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import flow_process, questions, wait_for_requests

from flow.errors import StoreLockedError
from flow.simulator import SimulatorConfig, SimulatorThread
from flow.store.sqlite import SQLiteStore

HOLD = """
import asyncio, sys, time
from pathlib import Path
from flow.store.sqlite import SQLiteStore

async def main() -> None:
    store = await SQLiteStore.open(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)

asyncio.run(main())
"""
# children import this checkout's flow, whatever folder a test has moved to
ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that opens the store at `path` for a run and keeps it open."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path.absolute())],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        yield child
    finally:
        child.kill()
        child.wait()


def symlink(folder: Path, real: Path) -> Path:
    link = folder / "link.db"
    link.symlink_to(real.name)
    return link


def relative(folder: Path, real: Path) -> Path:
    os.chdir(folder)
    return Path(real.name)


def hard_link(folder: Path, real: Path) -> Path:
    link = folder / "hard.db"
    os.link(real, link)
    return link


def shadow(folder: Path, real: Path) -> Path:
    """The store's folder reached through a symlinked folder."""
    alias = folder.parent / (folder.name + "-alias")
    alias.symlink_to(folder, target_is_directory=True)
    return alias / real.name


@pytest.mark.parametrize("other_path", [symlink, relative, hard_link, shadow])
async def test_a_second_open_by_another_path_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        other_path: Callable[[Path, Path], Path]) -> None:
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "real.db"
    with holder(real) as child:
        # a hard link has another name, so its pid file is not found: the pid may be unknown
        owner = "unknown" if other_path is hard_link else str(child.pid)
        with pytest.raises(StoreLockedError, match=f"another flow run \\(pid {owner}\\)"):
            await SQLiteStore.open(other_path(tmp_path, real))


async def test_a_store_held_through_a_symlink_refuses_its_real_path(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    with (holder(symlink(tmp_path, real)) as child,
          pytest.raises(StoreLockedError, match=f"pid {child.pid}")):
        await SQLiteStore.open(real)


async def test_deleting_files_beside_a_live_store_lets_no_second_run_in(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    with holder(path):
        for name in ("flow.db.lock", "flow.db.pid"):
            (tmp_path / name).unlink(missing_ok=True)
        with pytest.raises(StoreLockedError, match="another flow run"):
            await SQLiteStore.open(path)


@pytest.mark.parametrize("trap", ["symlink", "hard link"])
async def test_a_linked_file_where_the_lock_would_go_leaves_its_target_untouched(
        tmp_path: Path, trap: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("flow.db.lock", "flow.db.pid"):
        if trap == "symlink":
            (tmp_path / name).symlink_to(victim)
        else:
            os.link(victim, tmp_path / name)
    path = tmp_path / "flow.db"
    store = await SQLiteStore.open(path)
    try:
        assert victim.read_text() == "precious"
        pid_file = tmp_path / "flow.db.pid"
        assert not pid_file.is_symlink() and pid_file.read_text() == str(os.getpid())
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            await SQLiteStore.open(path)
    finally:
        await store.close()
    assert victim.read_text() == "precious"


async def test_closing_the_store_frees_it_and_removes_the_pid_file(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    store = await SQLiteStore.open(path)
    await store.close()
    assert not (tmp_path / "flow.db.pid").exists()
    store = await SQLiteStore.open(symlink(tmp_path, path))
    await store.close()


async def test_a_killed_holder_frees_the_store(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    with holder(path) as child:
        child.send_signal(signal.SIGKILL)
        child.wait()
        store = await SQLiteStore.open(path)
        await store.close()


async def test_the_store_stays_readable_and_writable_by_sqlite_beside_a_live_run(
        tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    with holder(path):
        reader = await SQLiteStore.open_read_only(symlink(tmp_path, path))
        try:
            assert await reader.known_items("call", ["a"]) == {}
        finally:
            await reader.close()
        # the run's lock is not SQLite's: another program may still take a write lock
        with sqlite3.connect(path, isolation_level=None, timeout=5) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        db.close()


@pytest.mark.slow
def test_a_run_on_a_symlink_to_a_live_store_is_refused_naming_the_process(
        make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=300)) as server:
        first_pipeline = make_pipeline(rows=questions(200), base_url=server.url,
                                       call={"concurrency": 4}, store="real.db")
        first = flow_process(first_pipeline)
        wait_for_requests(server, 4)
        (first_pipeline.folder / "link.db").symlink_to("real.db")
        second = flow_process(make_pipeline(rows=questions(200), base_url=server.url,
                                            store="link.db"))
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert f"another flow run (pid {first.pid})" in err and "Traceback" not in err
        first.send_signal(signal.SIGINT)
        first.send_signal(signal.SIGINT)
        assert first.wait(30) == 130
