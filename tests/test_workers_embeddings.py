"""Embeddings on a PostgreSQL store: workers pack the inputs they claim into requests, each
item's vector committed under its own lease, and the exports are SQLite's.

A real PostgreSQL server (`postgres_url`), workers in this process and in a child process
(`flow worker`, killed), and the simulator over loopback HTTP through the `openai` SDK.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
from conftest import API_KEY, Pipeline, run_within

from flow.config import load_config
from flow.config.store_url import StoreURL, store_url
from flow.plan import RunOptions
from flow.records import OutputRecord, ResponseRecord, Settled, Usage, utc_now
from flow.simulator import SimulatorThread
from flow.store.postgres.store import PostgresStore
from flow.workers.worker import Worker, WorkOptions

pytestmark = pytest.mark.slow

DIMENSIONS = 64  # short vectors: the exports' JSON is quick to write
EMBED = {"endpoint": "embeddings", "model": "text-embedding-3-small", "input": "{{ text }}",
         "params": {"dimensions": DIMENSIONS}, "inputs_per_request": 50}


def _rows(count: int) -> list[dict[str, Any]]:
    # each text the same length and 5 tokens: an item's share of its request's tokens (by
    # length) is then its own, whichever items a worker packed beside it
    return [{"id": f"e{i:05d}", "text": f"short text number {i:03d}"} for i in range(count)]


def _pipeline(make_pipeline: Any, simulator: SimulatorThread, rows: list[dict[str, Any]],
              store: str = "flow.db", **call: Any) -> Pipeline:
    pipeline: Pipeline = make_pipeline(rows=rows, base_url=simulator.url, post=[],
                                       call={**EMBED, **call})
    del pipeline.config["call"]["messages"]  # an embeddings stage has `input` instead
    pipeline.config["store"] = store
    pipeline.write()
    return pipeline


def _work(pipeline: Pipeline, count: int, lease_s: float = 30.0) -> list[str]:
    """Run `count` workers in this process until the queue is empty; their end states."""
    async def work() -> list[str]:
        workers = [Worker(load_config(pipeline.file), RunOptions(),
                          WorkOptions(lease_s=lease_s, poll_s=0.01)) for _ in range(count)]
        return [summary.state for summary in
                await asyncio.gather(*(worker.execute() for worker in workers))]
    return run_within(work())


def _rows_of(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def _one_vector_each(url: str, items: int) -> None:
    """Every item done, from a reply with one vector; no vector unused."""
    assert _rows_of(url, "SELECT COUNT(*), COUNT(DISTINCT results.item_id), "
                         "MIN(vectors.dimensions), MAX(length(vectors.vector)) FROM results "
                         "JOIN vectors ON vectors.response_id = results.response_id "
                         "WHERE results.status = 'done'") == [(items, items, DIMENSIONS,
                                                                 DIMENSIONS * 4)]
    assert _rows_of(url, "SELECT COUNT(*) FROM vectors") == [(items,)]


def _exports(pipeline: Pipeline, folder: Path) -> dict[str, Any]:
    """The pipeline's export in each format: Parquet as a table, JSONL and CSV as text."""
    folder.mkdir()
    files = {fmt: folder / f"out.{fmt}" for fmt in ("parquet", "jsonl", "csv")}
    for out in files.values():
        assert pipeline.cli("export", "-o", str(out)) == 0
    return {"parquet": pq.read_table(files["parquet"]),
            "jsonl": files["jsonl"].read_text(encoding="utf-8"),
            "csv": files["csv"].read_text(encoding="utf-8")}


def test_two_workers_pack_each_claim_and_export_what_sqlite_does(
        make_pipeline: Any, postgres_url: str, simulator: SimulatorThread, tmp_path: Path,
        capsys: Any) -> None:
    rows = _rows(300)
    local = _pipeline(make_pipeline, simulator, rows, concurrency=2)
    assert local.run() == 0
    assert simulator.stats.requests == 6
    from_sqlite = _exports(local, tmp_path / "sqlite")

    shared = _pipeline(make_pipeline, simulator, rows, store=postgres_url, concurrency=2)
    assert shared.cli("plan") == 0
    assert _rows_of(postgres_url, "SELECT COUNT(*) FROM work") == [(300,)]  # one an item
    before = simulator.stats.requests, simulator.stats.embedded_inputs
    assert _work(shared, 2) == ["finished", "finished"]
    # a claim is 2 x 50 inputs, sent as two requests; a worker's last claim may be short
    requests = simulator.stats.requests - before[0]
    assert 6 <= requests <= 8 and simulator.stats.embedded_inputs - before[1] == 300
    _one_vector_each(postgres_url, 300)
    # float32 bytes (and a length), not JSON text
    ((size,),) = _rows_of(postgres_url, "SELECT MAX(pg_column_size(vector)) FROM vectors")
    assert size <= DIMENSIONS * 4 + 4
    from_postgres = _exports(shared, tmp_path / "postgres")
    assert from_postgres["parquet"].equals(from_sqlite["parquet"])
    assert from_postgres["jsonl"] == from_sqlite["jsonl"]
    assert from_postgres["csv"] == from_sqlite["csv"]
    capsys.readouterr()
    assert shared.cli("show", "e00007") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["embedding"]["dimensions"] == DIMENSIONS and len(shown["embedding"]["first_8"]) == 8
    assert shared.cli("status") == 0


def test_a_killed_workers_items_are_embedded_by_the_next_sending_only_what_is_missing(
        make_pipeline: Any, postgres_url: str, simulator: SimulatorThread) -> None:
    simulator.config.latency_ms = 30
    pipeline = _pipeline(make_pipeline, simulator, _rows(300), store=postgres_url,
                         concurrency=1)
    assert pipeline.cli("plan") == 0
    child = subprocess.Popen(
        [sys.executable, "-m", "flow", "worker", str(pipeline.file), "--lease-s", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OPENAI_API_KEY": API_KEY})
    deadline = time.monotonic() + 30
    while simulator.stats.embedded_inputs < 100 and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=10)
    ((stored,),) = _rows_of(postgres_url, "SELECT COUNT(*) FROM vectors")
    assert 50 <= stored < 300
    before = simulator.stats.embedded_inputs
    simulator.config.latency_ms = 0
    # the killed worker's lease on the pack it had in flight runs out; this one takes it
    assert _work(pipeline, 1) == ["finished"]
    assert simulator.stats.embedded_inputs - before == 300 - stored
    _one_vector_each(postgres_url, 300)


def test_an_input_too_long_or_refused_fails_alone_on_a_shared_store(
        make_pipeline: Any, postgres_url: str, simulator: SimulatorThread) -> None:
    rows = _rows(20)
    rows[3]["text"] = "word " * 9000
    rows[12]["text"] = "this one is refused [sim:status=400]"
    pipeline = _pipeline(make_pipeline, simulator, rows, store=postgres_url,
                         inputs_per_request=10)
    assert pipeline.cli("run") == 1  # plan, then work: two items failed
    results = dict(_rows_of(postgres_url, "SELECT item_id, COALESCE(error_class, status) "
                                          "FROM results"))
    assert results.pop("e00003") == "InputTooLongError"
    assert results.pop("e00012") == "BadRequestError"
    assert set(results.values()) == {"done"}
    assert simulator.stats.embedded_inputs >= 18  # the long one never sent
    ((vectors,),) = _rows_of(postgres_url, "SELECT COUNT(*) FROM vectors")
    assert vectors == 18
    assert _rows_of(postgres_url, "SELECT COUNT(*) FROM work WHERE state <> 'done'") == [(0,)]


def test_a_late_result_keeps_its_paid_reply_but_not_its_vector(
        make_pipeline: Any, postgres_url: str, simulator: SimulatorThread) -> None:
    pipeline = _pipeline(make_pipeline, simulator, _rows(1), store=postgres_url)
    assert pipeline.cli("plan") == 0
    ((origin, key, request),) = _rows_of(postgres_url, "SELECT origin, request_key, request "
                                                       "FROM work")

    def result(lease: int, vector: bytes) -> Settled:
        now = utc_now()
        reply = ResponseRecord(key, origin, "text-embedding-3-small", request, "{}", Usage(5),
                               0.0001, 1, 1.0, now, now, vector=vector)
        output = OutputRecord("e00000", key, "done", "", json.dumps({"dimensions": 1}))
        return Settled("call", origin, key, now, reply, [], [output], lease=lease)

    async def race() -> None:
        url = store_url(load_config(pipeline.file).store)
        late, taker = await PostgresStore.open(url), await PostgresStore.open(url)
        try:
            for store in (late, taker):
                await store.start_run(pipeline.file, origin, "test")
            (paused,) = await late.queue.claim(origin, ["call"], 1, 30)
            # its lease runs out while it is paused: another worker takes the request
            with psycopg.connect(postgres_url, autocommit=True) as db:
                db.execute("UPDATE work SET lease_until = now() - interval '1 second'")
            (taken,) = await taker.queue.claim(origin, ["call"], 1, 30)
            await taker.save(result(taken.token, b"\x00\x00\x80\x3f"))  # 1.0
            await late.save(result(paused.token, b"\x00\x00\x00\x40"))  # 2.0, refused
        finally:
            await late.close()
            await taker.close()
        assert (late.rejected, taker.rejected) == (1, 0)

    run_within(race())
    # both replies paid and kept; one vector, the lease holder's, and the item made from it
    assert _rows_of(postgres_url, "SELECT COUNT(*) FROM responses") == [(2,)]
    assert _rows_of(postgres_url, "SELECT vector FROM vectors") == [(b"\x00\x00\x80\x3f",)]
    assert _rows_of(postgres_url, "SELECT COUNT(*) FROM results JOIN vectors ON "
                                  "vectors.response_id = results.response_id") == [(1,)]


def test_a_group_of_vectors_larger_than_the_sockets_buffer_is_committed(
        postgres_url: str) -> None:
    # 300 vectors of 1,536 floats: 1.8 MB in one group's rows, more than a socket takes at
    # once (the commit once waited for good on results the server could not yet send)
    vectors = [bytes([i % 256]) * 6144 for i in range(300)]

    def result(index: int) -> Settled:
        now, key = utc_now(), f"key{index}"
        reply = ResponseRecord(key, "origin", "text-embedding-3-small", "{}", "{}", Usage(5),
                               0.0001, 1, 1.0, now, now, vector=vectors[index])
        return Settled("call", "origin", key, now, reply, [], [])

    async def save() -> None:
        store = await PostgresStore.open(StoreURL(postgres_url))
        try:
            await store.start_run(Path("pipeline.yaml"), "origin", "test")
            # saved at once: one group (or a few), as a worker's packed replies come; a
            # commit that never returns fails the test rather than hang it
            await asyncio.wait_for(asyncio.gather(*(store.save(result(i))
                                                    for i in range(300))), 60)
        finally:
            await asyncio.wait_for(store.close(), 60)

    run_within(save())
    stored = _rows_of(postgres_url, "SELECT vector FROM vectors JOIN responses ON "
                                    "responses.id = vectors.response_id ORDER BY "
                                    "substr(responses.request_key, 4)::int")
    assert [vector for (vector,) in stored] == vectors


def test_a_worker_sends_its_pack_when_the_budget_waits_for_it(
        make_pipeline: Any, postgres_url: str, simulator: SimulatorThread) -> None:
    # near the cap the budget waits for the calls in flight to settle before it lets more
    # go; the calls gathered into a pack count as in flight, so the pack must go (it waited
    # for them for good, nothing sent)
    price = {"input_per_1m": 1000, "output_per_1m": 0}  # each input guessed at about $0.02
    pipeline = _pipeline(make_pipeline, simulator, _rows(40), store=postgres_url,
                         concurrency=1, max_cost_usd=0.05, price=price)
    assert pipeline.cli("plan") == 0
    assert _work(pipeline, 1) == ["stopped"]  # the cap reached, not waited on
    ((spent, items),) = _rows_of(postgres_url, "SELECT SUM(cost_usd), COUNT(*) FROM responses")
    assert spent >= 0.05 and 3 < items < 40
