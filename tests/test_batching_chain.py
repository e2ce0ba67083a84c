"""A batch stage within a chain on a PostgreSQL store: each stage runs its own way in every
worker at once (online through its lane, batch through shards cut from the queue), each
result handed on to the next stage as it is committed; the same exports as on SQLite, each
batch created once, and a worker killed mid-chain taken over without a second batch.

A real PostgreSQL server (`postgres_url`), the real SDK against the simulator's Batch API.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import API_KEY, Pipeline, flow_process, questions, run_within, write_rows

from flow.config import load_config
from flow.plan import RunOptions
from flow.simulator import SimulatorConfig, SimulatorThread
from flow.workers.worker import Worker, WorkOptions

# polls zeroed; gather_s long, so a partial shard is cut only once its input has ended
FAST = {"first_poll_s": 0.01, "max_poll_s": 0.02, "gather_s": 60, "create_grace_s": 0,
        "max_requests_per_batch": 10}
QUICK = WorkOptions(lease_s=5, poll_s=0.01)


@pytest.fixture
def batch_server() -> Any:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.05)) as server:
        yield server


def chain(folder: Path, store: str, base_url: str, batch_at: tuple[int, ...],
          items: int = 25) -> Pipeline:
    """answer -> grade, the stages at `batch_at` through the Batch API."""
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(folder / "rows.jsonl", questions(items))
    stages: list[dict[str, Any]] = [
        {"name": "answer", "messages": [{"role": "user", "content": "{{ question }}"}],
         "post": [{"regex": "You asked: (.*)"}]},
        {"name": "grade", "model": "gpt-4o",
         "messages": [{"role": "user", "content": "Grade: {{ answer.output }}"}],
         "post": ["strip"]}]
    for index in batch_at:
        stages[index].update({"executor": "batch", "batch": FAST})
    return Pipeline(folder, {
        "store": store, "load": {"path": "rows.jsonl", "id": "id"},
        "defaults": {"model": "gpt-4o-mini", "base_url": base_url, "timeout_s": 5,
                     "concurrency": 8},
        "stages": stages})


def exported(pipeline: Pipeline, capsys: pytest.CaptureFixture[str],
             stage: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert pipeline.cli("export", "--stage", stage) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def pg(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def each_batch_once(server: SimulatorThread, url: str, stages: int = 1) -> None:
    """Every batch the store records created once, and none it does not record: full ones
    while more could come, the rest once the stage's input ended."""
    assert sorted(server.stats.batch_creates.values()) == [1, 1, 1] * stages
    assert pg(url, "SELECT state, lines, COUNT(*) FROM batches GROUP BY state, lines "
                   "ORDER BY lines") == [("collected", 5, stages), ("collected", 10, 2 * stages)]


def each_item_once(url: str) -> None:
    """Every item done once at each stage, each reply paid once, nothing left queued."""
    assert pg(url, "SELECT stage, COUNT(*), COUNT(DISTINCT item_id) FROM results "
                   "WHERE status = 'done' GROUP BY stage ORDER BY stage") == [
        ("answer", 25, 25), ("grade", 25, 25)]
    assert pg(url, "SELECT COUNT(*), COUNT(DISTINCT request_key) FROM responses") == [
        (50, 50)]
    assert pg(url, "SELECT COUNT(*) FROM work WHERE state <> 'done'") == [(0,)]


@pytest.mark.parametrize("batch_at", [(1,), (0,), (0, 1)],
                         ids=["online-then-batch", "batch-then-online", "batch-then-batch"])
def test_two_workers_run_a_chain_with_a_batch_stage_as_sqlite_does(
        monkeypatch: pytest.MonkeyPatch, batch_server: SimulatorThread, postgres_url: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str], batch_at: tuple[int, ...]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    local = chain(tmp_path / "sqlite", "flow.db", batch_server.url, batch_at)
    assert local.run() == 0
    batch_server.stats.batch_creates.clear()
    shared = chain(tmp_path / "pg", postgres_url, batch_server.url, batch_at)
    assert shared.cli("plan") == 0
    config = load_config(shared.write())

    async def together() -> list[str]:
        workers = [Worker(config, RunOptions(), QUICK) for _ in range(2)]
        return [s.state for s in await asyncio.gather(*(w.execute() for w in workers))]

    assert run_within(together()) == ["finished", "finished"]
    for stage in ("answer", "grade"):
        assert exported(shared, capsys, stage) == exported(local, capsys, stage)
    each_batch_once(batch_server, postgres_url, len(batch_at))
    each_item_once(postgres_url)
    # 25 items a stage on each store, each sent once: online or as a batch line
    online = 2 - len(batch_at)
    assert (batch_server.stats.requests, batch_server.stats.batch_lines) == (
        50 * online, 50 * len(batch_at))


@pytest.mark.slow
@pytest.mark.parametrize(("batch_at", "moment"), [((1,), "created"), ((0,), "collecting")],
                         ids=["online-then-batch", "batch-then-online"])
def test_a_worker_killed_mid_chain_is_taken_over_without_a_second_batch(
        monkeypatch: pytest.MonkeyPatch, batch_server: SimulatorThread, postgres_url: str,
        tmp_path: Path, batch_at: tuple[int, ...], moment: str) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    pipeline = chain(tmp_path, postgres_url, batch_server.url, batch_at)
    child = flow_process(pipeline, env={"FLOW_CRASH_AT": moment})
    child.wait(60)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    assert pg(postgres_url, "SELECT COUNT(*) FROM batches WHERE state <> 'collected'") != [
        (0,)]  # killed with a batch at the provider
    assert pipeline.run() == 0  # takes the dead worker's shards over at once
    each_batch_once(batch_server, postgres_url)
    each_item_once(postgres_url)


def test_a_worker_cancelled_mid_chain_gives_its_shards_to_the_others(
        monkeypatch: pytest.MonkeyPatch, batch_server: SimulatorThread, postgres_url: str,
        tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    pipeline = chain(tmp_path, postgres_url, batch_server.url, (1,))
    assert pipeline.cli("plan") == 0
    config = load_config(pipeline.file)

    async def cancelled_then_finished() -> list[str]:
        worker = asyncio.create_task(Worker(config, RunOptions(), QUICK).execute())
        async with await psycopg.AsyncConnection.connect(postgres_url) as db:
            while not worker.done():  # until a batch of the later stage is created
                cursor = await db.execute("SELECT COUNT(*) FROM batches WHERE stage = 'grade' "
                                          "AND batch_id IS NOT NULL")
                if (await cursor.fetchone()) != (0,):
                    break
                await asyncio.sleep(0.005)
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        workers = [Worker(config, RunOptions(), QUICK) for _ in range(2)]
        return [s.state for s in await asyncio.gather(*(w.execute() for w in workers))]

    assert run_within(cancelled_then_finished()) == ["finished", "finished"]
    each_batch_once(batch_server, postgres_url)
    each_item_once(postgres_url)
