"""The Batch API on a PostgreSQL store: `flow run` and `flow worker` cut shards from the
queue, each shard driven by one worker at a time under a lease; the real SDK against the
simulator's Batch API, a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Pipeline, flow_process, questions, run_within, write_rows

from flow.config import load_config
from flow.config.store_url import StoreURL
from flow.execute.batch_shard import URL
from flow.plan import RunOptions
from flow.progress import RunSummary
from flow.records import ResponseRecord, Settled, Usage, utc_now
from flow.simulator import SimulatorConfig, SimulatorThread
from flow.store.postgres.shard_leases import ShardLostError, SharedShards
from flow.store.postgres.store import PostgresStore
from flow.workers.planning import plan_pipeline
from flow.workers.worker import Worker, WorkOptions

FAST = {"first_poll_s": 0.01, "max_poll_s": 0.05, "gather_s": 0.05, "create_grace_s": 0}


@pytest.fixture
def batch_server() -> Any:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.1)) as server:
        yield server


def batch_pipeline(make_pipeline: Any, server: SimulatorThread, store: str, items: int = 30,
                   per_batch: int = 10) -> Pipeline:
    pipeline = make_pipeline(rows=questions(items), base_url=server.url, call={
        "executor": "batch", "batch": {"max_requests_per_batch": per_batch, **FAST}})
    pipeline.config["store"] = store
    pipeline.write()
    return pipeline


def rows_of(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def creates(server: SimulatorThread) -> list[int]:
    return sorted(server.stats.batch_creates.values())


def each_item_once(url: str, items: int) -> None:
    """Every item done once, from one reply to its own request, each reply paid once."""
    assert rows_of(url, "SELECT COUNT(*), COUNT(DISTINCT item_id) FROM results "
                        "WHERE status = 'done'") == [(items, items)]
    assert rows_of(url, "SELECT COUNT(*), COUNT(DISTINCT request_key), COUNT(batch_id) "
                        "FROM responses") == [(items, items, items)]
    assert rows_of(url, "SELECT COUNT(*) FROM work WHERE state <> 'done'") == [(0,)]


def test_a_batch_stage_on_postgres_exports_what_it_does_on_sqlite(
        make_pipeline: Any, batch_server: SimulatorThread, postgres_url: str,
        capsys: Any) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, "flow.db")
    assert pipeline.run() == 0
    on_sqlite = pipeline.export(capsys)
    assert creates(batch_server) == [1, 1, 1]
    pipeline.config["store"] = postgres_url
    assert pipeline.run() == 0
    assert pipeline.export(capsys) == on_sqlite
    assert creates(batch_server) == [1] * 6 and batch_server.stats.requests == 0
    each_item_once(postgres_url, 30)
    assert rows_of(postgres_url, "SELECT state, lines FROM batches ORDER BY id") == [
        ("collected", 10)] * 3
    capsys.readouterr()
    assert pipeline.cli("status") == 0  # its table of batches, read as on SQLite
    assert capsys.readouterr().out.count("collected") == 3
    assert pipeline.run() == 0  # a re-run: nothing to send, no batch made
    assert creates(batch_server) == [1] * 6


def test_detach_then_a_rerun_collects_without_creating_on_postgres(
        make_pipeline: Any, batch_server: SimulatorThread, postgres_url: str) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, postgres_url)
    assert pipeline.run("--detach") == 0
    assert rows_of(postgres_url, "SELECT state, worker FROM batches") == [
        ("submitted", None)] * 3  # given back: any worker collects them
    assert pipeline.run() == 0
    assert creates(batch_server) == [1, 1, 1]
    each_item_once(postgres_url, 30)


def test_cancel_on_postgres_keeps_what_the_batches_finished(
        make_pipeline: Any, postgres_url: str, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=3600)) as server:
        pipeline = batch_pipeline(make_pipeline, server, postgres_url, items=40, per_batch=40)
        assert pipeline.run("--detach") == 0
        server.advance(1800)  # half the lines done
        capsys.readouterr()
        assert pipeline.cli("cancel") == 0
        assert ": cancelling" in capsys.readouterr().err
        server.config.batch_s = 0.1
        assert pipeline.run() == 0
        assert sum(creates(server)) == 2  # the cancelled lines in a second batch
    each_item_once(postgres_url, 40)


def test_a_refusal_stops_every_shard_and_gives_them_back(
        make_pipeline: Any, postgres_url: str, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.1, api_key="sk-another")) as server:
        pipeline = batch_pipeline(make_pipeline, server, postgres_url)
        assert pipeline.run() == 2  # a refusal stops the run, as online
    assert "the provider refused it (401" in capsys.readouterr().err
    assert rows_of(postgres_url, "SELECT state, worker FROM batches") == [
        ("planned", None)] * 3  # nothing made; any worker may take them up again


@pytest.mark.parametrize(("on_expired", "batches", "online"), [("requeue", 2, 0),
                                                              ("online", 1, 40)])
def test_expired_lines_go_back_to_the_queue_or_online_on_postgres(
        make_pipeline: Any, postgres_url: str, on_expired: str, batches: int,
        online: int) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.1,
                                         batch_faults={1: "expire:60"})) as server:
        pipeline = batch_pipeline(make_pipeline, server, postgres_url, items=100,
                                  per_batch=100)
        pipeline.config["call"]["batch"]["on_expired"] = on_expired
        assert pipeline.run() == 0
        assert sum(creates(server)) == batches and server.stats.requests == online
    assert rows_of(postgres_url, "SELECT COUNT(*), COUNT(DISTINCT request_key), "
                                 "COUNT(batch_id) FROM responses") == [(100, 100, 100 - online)]
    assert rows_of(postgres_url, "SELECT COUNT(*) FROM results WHERE status = 'done'") == [
        (100,)]
    assert rows_of(postgres_url, "SELECT COUNT(*) FROM work WHERE state <> 'done'") == [(0,)]


def test_broken_lines_are_reasked_online_under_their_leases_on_postgres(
        make_pipeline: Any, batch_server: SimulatorThread, postgres_url: str) -> None:
    batch_server.config.schema_break_rate = 0.2
    schema = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
              "required": ["label"]}
    pipeline = batch_pipeline(make_pipeline, batch_server, postgres_url, per_batch=30)
    pipeline.config["call"]["schema"], pipeline.config["post"] = schema, []
    assert pipeline.run() == 0
    broken = batch_server.stats.schema_broken
    assert broken > 0 and batch_server.stats.requests == broken  # each re-asked once
    assert rows_of(postgres_url, "SELECT COUNT(*), COUNT(DISTINCT request_key), "
                                 "COUNT(batch_id) FROM responses") == [
        (30 + broken, 30 + broken, 30)]  # the broken lines kept, the re-asks beside them
    outputs = rows_of(postgres_url, "SELECT output FROM results WHERE status = 'done'")
    assert len(outputs) == 30 and all('"label"' in output for (output,) in outputs)
    assert rows_of(postgres_url, "SELECT COUNT(*) FROM work WHERE state <> 'done'") == [(0,)]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["intent", "created", "collecting"])
def test_a_kill_at_any_step_never_creates_a_second_batch_on_postgres(
        make_pipeline: Any, batch_server: SimulatorThread, postgres_url: str,
        moment: str) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, postgres_url)
    child = flow_process(pipeline, env={"FLOW_CRASH_AT": moment})
    child.wait(60)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    # the re-run takes over the dead process's shards at once (same machine, pid gone)
    assert pipeline.run() == 0
    assert creates(batch_server) == [1, 1, 1]
    each_item_once(postgres_url, 30)


def test_two_workers_share_the_batches_and_create_each_once(
        make_pipeline: Any, batch_server: SimulatorThread, postgres_url: str) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, postgres_url, items=60)
    assert pipeline.cli("plan") == 0
    config = load_config(pipeline.file)

    async def work() -> list[RunSummary]:
        workers = [Worker(config, RunOptions(), WorkOptions(lease_s=5)) for _ in range(2)]
        return await asyncio.gather(*(worker.execute() for worker in workers))

    summaries = run_within(work())
    assert [summary.state for summary in summaries] == ["finished"] * 2
    assert sum(summary.progress.done for summary in summaries) == 60
    assert creates(batch_server) == [1] * 6
    each_item_once(postgres_url, 60)
    assert rows_of(postgres_url, "SELECT COUNT(*) FROM batches WHERE state = 'collected'") == [
        (6,)]


async def until_done(worker: Worker, items: int, working: asyncio.Task[RunSummary]) -> None:
    """Until `worker` has done `items` items, or ended (its progress looked at, not a wait
    for a time)."""
    while True:
        if worker.progress.done >= items or working.done():
            return
        await asyncio.sleep(0.01)


def test_a_waiting_worker_batches_what_is_planned_after_it_started(
        make_pipeline: Any, batch_server: SimulatorThread, postgres_url: str) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, postgres_url)
    write_rows(pipeline.folder / "rows.jsonl", questions(10))
    config = load_config(pipeline.file)

    async def work() -> RunSummary:
        await plan_pipeline(config, RunOptions())
        worker = Worker(config, RunOptions(), WorkOptions(wait_for_work=True))
        working = asyncio.create_task(worker.execute())
        await until_done(worker, 10, working)
        write_rows(pipeline.folder / "rows.jsonl", questions(30))  # 20 more, planned later
        await plan_pipeline(config, RunOptions())
        await until_done(worker, 30, working)
        worker.request_stop()
        return await working

    assert run_within(work()).state == "interrupted"
    assert creates(batch_server) == [1, 1, 1]
    each_item_once(postgres_url, 30)


def batch_reply(key: str, lease: int) -> Settled:
    """A line's reply from batch `batch_1`, committed under `lease`."""
    now = utc_now()
    response = ResponseRecord(key, "test", "m", "{}", "{}", Usage(10, 2), 0.25, 1, 0.0, now,
                              now, batch_id="batch_1")
    return Settled("call", "test", key, now, response, [], [], lease=lease)


def test_a_shard_taken_over_fences_out_the_worker_that_lost_it(postgres_url: str) -> None:
    async def scenario() -> None:
        url = StoreURL(postgres_url)
        first, second = await PostgresStore.open(url), await PostgresStore.open(url)
        try:
            for store in (first, second):
                await store.start_run(Path("pipeline.yaml"), "test", "test")
            await first.queue.enqueue("call", "test", [("k1", "{}"), ("k2", "{}")])
            lost = SharedShards(first, "call", "test", lease_s=0)  # its lease ran out at once
            shard = await lost.cut(URL, first.run_id, 10, len, lambda request: 0.0)
            assert shard is not None and set(lost.line_tokens) == {"k1", "k2"}
            holder = SharedShards(second, "call", "test", lease_s=30)
            taken = await holder.take()
            assert taken is not None and taken.id == shard.id
            assert set(holder.line_tokens) == {"k1", "k2"}
            assert await SharedShards(first, "call", "test", 30).take() is None  # held now
            with pytest.raises(ShardLostError):
                await lost.mark(shard.id, ["k1"], "done")  # its lines are not its to mark
            shard.state = "creating"
            with pytest.raises(ShardLostError):
                await lost.save(shard)
            await holder.mark(shard.id, ["k2"], "requeued")
            late = batch_reply("k1", lost.line_tokens["k1"])
            await first.save(late)
            await first.flush()
            assert late.rejected  # the line is not stored by the worker that lost it...
            kept = batch_reply("k1", holder.line_tokens["k1"])
            await second.save(kept)
            await second.flush()
            assert not kept.rejected  # ...but by the one holding it, once
        finally:
            await first.close()
            await second.close()

    run_within(scenario())
    assert rows_of(postgres_url, "SELECT request_key FROM responses") == [("k1",)]
    assert rows_of(postgres_url, "SELECT state FROM batches") == [("planned",)]
    assert rows_of(postgres_url, "SELECT request_key, state FROM batch_lines ORDER BY 1") == [
        ("k1", "pending"), ("k2", "requeued")]
    assert rows_of(postgres_url, "SELECT request_key, state FROM work ORDER BY 1") == [
        ("k1", "done"), ("k2", "leased")]


def test_a_shard_whose_worker_is_gone_is_taken_before_its_lease_runs_out(
        postgres_url: str) -> None:
    async def scenario() -> None:
        url = StoreURL(postgres_url)
        gone, other = await PostgresStore.open(url), await PostgresStore.open(url)
        try:
            await gone.start_run(Path("pipeline.yaml"), "test", "test")
            await gone.queue.enqueue("call", "test", [("k1", "{}")])
            held = SharedShards(gone, "call", "test", lease_s=3600)
            shard = await held.cut(URL, gone.run_id, 10, len, lambda request: 0.0)
            taker = SharedShards(other, "call", "test", lease_s=30)
            assert await taker.take() is None  # its worker lives: an hour's lease stands
            await gone.close()  # the session ends, as when the process dies
            taken = None
            for _ in range(500):  # the server ends the session (and its lock) a moment later
                if (taken := await taker.take()) is not None:
                    break
                await asyncio.sleep(0.01)
            assert shard is not None and taken is not None and taken.id == shard.id
            assert set(taker.line_tokens) == {"k1"}
        finally:
            await other.close()

    run_within(scenario())
    assert rows_of(postgres_url, "SELECT claims FROM work") == [(2,)]


def test_a_worker_with_another_executor_than_planned_refuses_to_start(
        make_pipeline: Any, batch_server: SimulatorThread, postgres_url: str,
        capsys: Any) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, postgres_url)
    assert pipeline.cli("plan") == 0
    pipeline.config["call"]["executor"] = "online"
    assert pipeline.cli("worker") == 2
    assert "the executor (planned batch, this file online)" in capsys.readouterr().err


def test_a_worker_cuts_a_shard_while_a_plan_holds_the_store(postgres_url: str) -> None:
    # `flow plan` holds the store's lock while it plans: a worker's cut goes on meanwhile
    async def scenario() -> None:
        url = StoreURL(postgres_url)
        planner = await PostgresStore.open(url, exclusive=True)
        worker = await PostgresStore.open(url)
        try:
            await worker.start_run(Path("pipeline.yaml"), "test", "test")
            await worker.queue.enqueue("call", "test", [("k1", "{}")])
            async with asyncio.timeout(5):
                shard = await SharedShards(worker, "call", "test", lease_s=30).cut(
                    URL, worker.run_id, 10, len, lambda request: 0.0)
            assert shard is not None and shard.lines == 1
        finally:
            await worker.close()
            await planner.close()

    run_within(scenario())
