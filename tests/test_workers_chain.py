"""Chains of stages on a PostgreSQL store: planned, worked by several workers, each item
handed to the next stage as soon as its earlier output is committed; the same items,
outputs and content keys as a run on SQLite, and nothing paid twice when a worker dies
between a commit and its hand-on.

A real PostgreSQL server (`postgres_url`), workers in this process (two at once, each with
its own connection) and the simulator over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Pipeline, run_within, wait_for_requests, write_rows
from test_chain import calls, rows
from test_chain import chain as two_stages

from flow.config import load_config
from flow.plan import RunOptions
from flow.simulator import SimulatorThread
from flow.store.postgres.queue import WorkQueue
from flow.workers.worker import Worker, WorkOptions

pytestmark = pytest.mark.slow

QUICK = WorkOptions(poll_s=0.01)  # a worker waiting for another's work looks again at once


def chain(folder: Path, store: str, base_url: str, items: list[dict[str, Any]],
          **grade: Any) -> Pipeline:
    """test_chain's pipeline (answer, then grade, on two models) on `store`, 8 requests at a
    time, each tried 3 times at most."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = two_stages(folder, base_url, items, **grade)
    pipeline.config["store"] = store
    pipeline.config["defaults"].update(concurrency=8, retry={
        "max_tries": 3, "max_time_s": 30, "first_wait_s": 0, "max_wait_s": 0})
    return pipeline


def work(pipeline: Pipeline, count: int = 1) -> list[str]:
    """`count` workers at once, in this process, until no request is left: their states."""
    config = load_config(pipeline.write())

    async def together() -> list[str]:
        workers = [Worker(config, RunOptions(), QUICK) for _ in range(count)]
        return [s.state for s in await asyncio.gather(*(w.execute() for w in workers))]

    return run_within(together())


def exported(pipeline: Pipeline, capsys: pytest.CaptureFixture[str],
             *args: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert pipeline.cli("export", *args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def keys_of_pg(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute("SELECT stage, item_id, request_key, skipped, error_class FROM items "
                          "ORDER BY stage, item_id").fetchall()


def pg(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def test_two_workers_give_a_chain_the_outputs_and_keys_a_sqlite_run_gives(
        env: None, simulator: SimulatorThread, postgres_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    items = rows(40)
    local = chain(tmp_path / "sqlite", "flow.db", simulator.url, items)
    assert local.run() == 0
    assert calls(simulator) == (40, 40)
    shared = chain(tmp_path / "pg", postgres_url, simulator.url, items)
    assert shared.cli("plan") == 0
    assert work(shared, 2) == ["finished", "finished"]
    assert calls(simulator) == (80, 80)  # every item called once at each stage on each store
    for stage in ("answer", "grade"):
        assert exported(shared, capsys, "--stage", stage) == exported(local, capsys,
                                                                      "--stage", stage)
    assert keys_of_pg(postgres_url) == local.query(
        "SELECT stage, item_id, request_key, skipped, error_class FROM items "
        "ORDER BY stage, item_id")
    # every reply paid once, by one item, and every request done
    assert pg(postgres_url, "SELECT COUNT(*), COUNT(DISTINCT request_key) FROM responses") == [
        (80, 80)]
    assert pg(postgres_url, "SELECT stage, COUNT(*) FROM work WHERE state = 'done' "
                            "GROUP BY stage ORDER BY stage") == [("answer", 40), ("grade", 40)]
    assert shared.cli("plan") == 0  # planned again: nothing is left to queue
    assert pg(postgres_url, "SELECT COUNT(*) FROM work WHERE state <> 'done'") == [(0,)]


def test_when_false_skips_a_stage_on_postgres_as_on_sqlite_and_the_item_goes_on(
        env: None, simulator: SimulatorThread, postgres_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    items = rows(20)
    skip_hard = {"when": "{{ 'Think' not in answer.output }}"}  # false for every 10th
    note = {"name": "note", "model": "gpt-4.1-mini",
            "messages": [{"role": "user", "content": "Note: {{ question }} {{ grade is defined }}"}]}
    local = chain(tmp_path / "sqlite", "flow.db", simulator.url, items, **skip_hard)
    local.config["stages"].append(note)
    assert local.run() == 0
    shared = chain(tmp_path / "pg", postgres_url, simulator.url, items, **skip_hard)
    shared.config["stages"].append(note)
    assert shared.cli("plan") == 0
    assert work(shared) == ["finished"]
    assert calls(simulator) == (40, 36)  # grade: 18 on each store
    for stage in ("answer", "grade", "note"):
        assert exported(shared, capsys, "--stage", stage) == exported(local, capsys,
                                                                      "--stage", stage)
    graded = {r["id"]: r for r in exported(shared, capsys, "--stage", "grade")}
    assert graded["q00010"]["status"] == "skipped" and graded["q00010"]["output"] is None
    noted = {r["id"]: r for r in exported(shared, capsys)}
    # skipped at grade, the item went on to note without it
    assert noted["q00010"]["status"] == "done" and "False" in noted["q00010"]["output"]
    assert noted["q00011"]["status"] == "done" and "True" in noted["q00011"]["output"]
    assert pg(postgres_url, "SELECT stage, COUNT(*) FROM work GROUP BY stage ORDER BY stage") == [
        ("answer", 20), ("grade", 18), ("note", 20)]


def test_an_item_failed_at_stage_one_gets_no_stage_two_work_and_status_shows_each_stage(
        env: None, simulator: SimulatorThread, postgres_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    items = rows(20)
    items[3]["question"] = "[sim:status=400] What is 3 plus 3?"
    shared = chain(tmp_path, postgres_url, simulator.url, items)
    assert shared.cli("plan") == 0
    assert work(shared, 2) == ["finished", "finished"]
    assert calls(simulator) == (20, 19)
    graded = {r["id"]: r for r in exported(shared, capsys)}
    assert graded["q00003"]["status"] == "failed"
    assert graded["q00003"]["error"].startswith("stopped at stage 'answer': ")
    assert pg(postgres_url, "SELECT stopped_at, error_class FROM results WHERE stage = 'grade' "
                            "AND item_id = 'q00003'") == [("answer", "BadRequestError")]
    assert pg(postgres_url, "SELECT COUNT(*) FROM work WHERE stage = 'grade'") == [(19,)]
    capsys.readouterr()
    assert shared.cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    answer, grade = status["stages"]
    assert (answer["stage"], answer["done"], answer["failed"]) == ("answer", 19, 1)
    assert (grade["stage"], grade["done"], grade["failed"], grade["failed_here"]) == (
        "grade", 19, 1, 0)
    assert status["queue"] == {"pending": 0, "leased": 0, "lease_expired": 0, "done": 39,
                               "stages": [
        {"stage": "answer", "pending": 0, "leased": 0, "lease_expired": 0, "done": 20},
        {"stage": "grade", "pending": 0, "leased": 0, "lease_expired": 0, "done": 19}]}
    assert shared.cli("status") == 0
    text = capsys.readouterr().out
    assert "answer: 0 pending, 0 leased, 0 expired, 20 done" in text
    assert "grade: 0 pending, 0 leased, 0 expired, 19 done" in text

    # the row fixed, `flow run` (plan, then work): stage 1 calls it, and it goes on
    items[3]["question"] = "What is 3 plus 3?"
    write_rows(tmp_path / "rows.jsonl", items)
    assert shared.run() == 0
    assert calls(simulator) == (21, 20)
    assert {r["id"]: r["status"] for r in exported(shared, capsys)}["q00003"] == "done"


@pytest.mark.parametrize("then", ["plan", "worker"])
def test_a_worker_cancelled_before_it_hands_on_leaves_nothing_to_pay_twice(
        env: None, simulator: SimulatorThread, postgres_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, then: str) -> None:
    shared = chain(tmp_path, postgres_url, simulator.url, rows(20))
    assert shared.cli("plan") == 0
    config = load_config(shared.file)
    enqueue = WorkQueue.enqueue

    async def stuck(queue: WorkQueue, stage: str, origin: str, calls: Any,
                    paid_again: bool = True) -> int:
        if stage == "grade":  # stage 1 committed, stage 2 never queued
            await asyncio.Event().wait()
        return await enqueue(queue, stage, origin, calls, paid_again)

    async def cancelled_once_stage_one_is_done() -> None:
        worker = asyncio.create_task(Worker(config, RunOptions(), QUICK).execute())
        async with await psycopg.AsyncConnection.connect(postgres_url) as db:
            while not worker.done():
                cursor = await db.execute("SELECT COUNT(*) FROM outputs WHERE stage = 'answer'")
                if (await cursor.fetchone()) == (20,):
                    break
                await asyncio.sleep(0.005)
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker

    monkeypatch.setattr(WorkQueue, "enqueue", stuck)
    run_within(cancelled_once_stage_one_is_done())
    monkeypatch.setattr(WorkQueue, "enqueue", enqueue)
    assert calls(simulator) == (20, 0)
    assert pg(postgres_url, "SELECT COUNT(*) FROM work WHERE stage = 'grade'") == [(0,)]
    if then == "plan":
        assert shared.cli("plan") == 0
        assert pg(postgres_url, "SELECT COUNT(*) FROM work WHERE stage = 'grade'") == [(20,)]
    assert work(shared, 2) == ["finished", "finished"]
    assert calls(simulator) == (20, 20)  # nothing sent twice at stage 1, or at stage 2
    assert {r["status"] for r in exported(shared, capsys)} == {"done"}
    assert pg(postgres_url, "SELECT COUNT(*), COUNT(DISTINCT request_key) FROM responses") == [
        (40, 40)]


def test_detach_is_refused_for_a_chain_with_a_batch_stage_on_postgres(
        env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = chain(tmp_path, "postgresql://flow@localhost/flow", "http://localhost:9",
                   rows(2), executor="batch")
    assert shared.run("--detach") == 2  # its later stage would wait on the batches
    assert "--detach" in capsys.readouterr().err


def test_a_worker_killed_mid_chain_costs_at_most_its_flight_and_each_item_is_done_once(
        env: None, simulator: SimulatorThread, postgres_url: str, tmp_path: Path) -> None:
    simulator.config.latency_ms = 10
    shared = chain(tmp_path, postgres_url, simulator.url, rows(40))
    assert shared.cli("plan") == 0
    killed = subprocess.Popen([sys.executable, "-m", "flow", "worker", str(shared.file),
                               "--lease-s", "0.5"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    wait_for_requests(simulator, 45)  # well into both stages
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    assert work(shared) == ["finished"]  # takes over once the dead worker's leases run out
    for stage in ("answer", "grade"):
        assert pg(postgres_url, f"SELECT COUNT(*), COUNT(DISTINCT item_id) FROM outputs "
                                f"WHERE stage = '{stage}' AND status = 'done'") == [(40, 40)]
    # a reply is committed once per request; what the dead worker had in flight is all that
    # was sent twice (its concurrency, at each stage)
    assert pg(postgres_url, "SELECT COUNT(*), COUNT(DISTINCT request_key) FROM responses") == [
        (80, 80)]
    assert pg(postgres_url, "SELECT COUNT(*) FROM outputs WHERE bought <> 0") == [(80,)]
    first, second = calls(simulator)
    assert 40 <= first <= 40 + 8 and 40 <= second <= 40 + 8
    assert pg(postgres_url, "SELECT COUNT(*) FROM work WHERE state <> 'done'") == [(0,)]


def test_an_item_goes_on_to_stage_two_before_stage_one_has_ended(
        env: None, simulator: SimulatorThread, postgres_url: str, tmp_path: Path) -> None:
    simulator.config.latency_ms = 10
    shared = chain(tmp_path, postgres_url, simulator.url, rows(8))
    shared.config["stages"][0]["concurrency"] = 1  # stage 1: eight round trips, in turn
    assert shared.cli("plan") == 0
    assert work(shared) == ["finished"]
    ((first_graded, last_answered),) = pg(postgres_url, """
        SELECT MIN(finished_at) FILTER (WHERE stage = 'grade'),
               MAX(finished_at) FILTER (WHERE stage = 'answer') FROM work""")
    assert first_graded < last_answered  # no barrier: grades ran while answers went on
    assert calls(simulator) == (8, 8)
