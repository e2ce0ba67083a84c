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
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import API_KEY, Pipeline, write_rows

from flow.cli import main
from flow.config import load_config
from flow.plan import RunOptions
from flow.simulator import SimulatorThread
from flow.store.postgres.queue import WorkQueue
from flow.workers.worker import WorkOptions, Worker

pytestmark = pytest.mark.slow

FIRST, SECOND = "gpt-4o-mini", "gpt-4o"  # one model per stage: the server counts each
QUICK = WorkOptions(poll_s=0.01)  # a worker waiting for another's work looks again at once


def rows(count: int) -> list[dict[str, Any]]:
    return [{"id": f"q{i:05d}", "question": f"What is {i} plus {i}?", "hard": i % 10 == 0}
            for i in range(count)]


def chain(folder: Path, store: str, base_url: str, items: list[dict[str, Any]],
          **grade: Any) -> Pipeline:
    """answer (the question the simulator echoes) -> grade, on two models."""
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(folder / "rows.jsonl", items)
    config = {
        "store": store,
        "load": {"path": "rows.jsonl", "id": "id"},
        "defaults": {"base_url": base_url, "concurrency": 8, "timeout_s": 5,
                     "retry": {"max_tries": 3, "max_time_s": 30, "first_wait_s": 0,
                               "max_wait_s": 0}},
        "stages": [
            {"name": "answer", "model": FIRST,
             "messages": [{"role": "user",
                           "content": "{{ question }}{% if hard %} Think.{% endif %}"}],
             "post": [{"regex": r"You asked: (?:\[sim:[^\]]*\] )?(.*)"}]},
            {"name": "grade", "model": SECOND,
             "messages": [{"role": "user", "content": "Grade: {{ answer.output }}"}],
             "post": ["strip"], **grade},
        ],
    }
    return Pipeline(folder, config)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def calls(server: SimulatorThread) -> tuple[int, int]:
    """Requests the server received for each stage so far."""
    return server.stats.by_model[FIRST], server.stats.by_model[SECOND]


def work(pipeline: Pipeline, count: int = 1) -> list[str]:
    """`count` workers at once, in this process, until no request is left: their states."""
    config = load_config(pipeline.write())

    async def together() -> list[str]:
        workers = [Worker(config, RunOptions(), QUICK) for _ in range(count)]
        return [s.state for s in await asyncio.gather(*(w.execute() for w in workers))]

    return asyncio.run(together())


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
