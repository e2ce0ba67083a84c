"""The PostgreSQL store behaves as the SQLite store does, through the same commands.

Each test runs against both stores where both apply: `flow run`, resume, an edited post
step, failures, `show`, `export` and `status` read the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Pipeline, questions, run_within

from flow.config.store_url import StoreURL
from flow.errors import StoreError
from flow.records import Attempt, Settled, utc_now
from flow.store.postgres.store import PostgresStore

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def on(kind: str, pipeline: Pipeline, request: pytest.FixtureRequest) -> Pipeline:
    if kind == "postgres":
        pipeline.config["store"] = request.getfixturevalue("postgres_url")
    return pipeline


def export(pipeline: Pipeline, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    rows = pipeline.export(capsys)
    return [{key: value for key, value in row.items()} for row in rows]


def test_a_run_resumes_and_reads_alike_on_either_store(
        make_pipeline: Any, simulator: Any, store_kind: str, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = questions(30) + [{"id": "same", "question": "What is 1 plus 1?"}]
    pipeline = on(store_kind, make_pipeline(rows, simulator.url), request)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 30  # the last row's request is the second row's
    first = export(pipeline, capsys)
    assert [row["id"] for row in first] == [row["id"] for row in rows]
    assert all(row["status"] == "done" for row in first)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 30  # a second run pays nothing
    pipeline.config["post"] = ["strip", "lower"]
    assert pipeline.run() == 0
    assert simulator.stats.requests == 30  # an edited post step re-posts stored replies
    again = export(pipeline, capsys)
    assert [row["output"] for row in again] == [row["output"].lower() for row in first]
    capsys.readouterr()
    assert pipeline.cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["items"], status["done"], status["replies_paid"]) == (31, 31, 30)
    assert pipeline.cli("show", "q00003") == 0
    shown = capsys.readouterr().out
    assert "What is 3 plus 3?" in shown


def test_failures_are_recorded_per_item_on_either_store(
        make_pipeline: Any, simulator: Any, store_kind: str, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = questions(10) + [{"id": "bad", "question": "[sim:status=400] refuse this"}]
    pipeline = on(store_kind, make_pipeline(rows, simulator.url), request)
    assert pipeline.run() == 1
    capsys.readouterr()
    assert pipeline.cli("failures", "--json") == 0
    failures = json.loads(capsys.readouterr().out)
    assert [f["id"] for f in failures] == ["bad"]
    assert failures[0]["error_class"] == "BadRequestError"


def test_paid_replies_cannot_be_changed_on_postgres(
        make_pipeline: Any, simulator: Any, postgres_url: str) -> None:
    pipeline = make_pipeline(questions(3), simulator.url)
    pipeline.config["store"] = postgres_url
    assert pipeline.run() == 0
    with psycopg.connect(postgres_url, autocommit=True) as db:
        for sql in ("UPDATE responses SET cost_usd = 0", "DELETE FROM responses",
                    "TRUNCATE responses CASCADE"):
            with pytest.raises(psycopg.Error, match="never changed"):
                db.execute(sql)


def test_a_worker_with_another_pipeline_refuses_to_start(
        make_pipeline: Any, simulator: Any, postgres_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = make_pipeline(questions(3), simulator.url)
    pipeline.config["store"] = postgres_url
    assert pipeline.cli("plan") == 0
    pipeline.config["post"] = ["strip", "lower"]
    capsys.readouterr()
    assert pipeline.cli("worker") == 2
    err = capsys.readouterr().err
    assert "differs from the one the store was planned with" in err and "post steps" in err
    assert simulator.stats.requests == 0


def test_a_sqlite_only_command_names_the_store_kind(
        make_pipeline: Any, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = make_pipeline(questions(3))
    assert pipeline.cli("plan") == 2
    assert "need a PostgreSQL store" in capsys.readouterr().err
    pipeline.config["store"] = postgres_url.replace("host=", "host=/nonexistent")
    assert pipeline.cli("status") == 2
    err = capsys.readouterr().err
    assert "cannot read the store" in err and "password" not in err


GRADED = {"messages": [{"role": "system", "content": "Grade the answer from 1 to 5. Reply with "
                                                     'a JSON object {"grade": n, "why": "..."}.'},
                       {"role": "user", "content": "{{ question }}"}],
          "params": {"response_format": {"type": "json_object"}}}


def test_outputs_as_fields_csv_and_parquet_export_alike_on_either_store(
        make_pipeline: Any, simulator: Any, store_kind: str, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    rows = [{"id": f"g{i}", "question": f"What is {i} plus {i}?", "n": i, "score": i / 4,
             "flag": i % 2 == 0, "tags": ["a", str(i)]} for i in range(6)]
    pipeline = on(store_kind, make_pipeline(rows, simulator.url, call=GRADED, post=["json"]),
                  request)
    assert pipeline.run() == 0
    capsys.readouterr()
    assert pipeline.cli("export", "--fields", "question,n,call.output,call.output.grade") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == [f"g{i}" for i in range(6)]
    assert [r["n"] for r in records] == list(range(6))
    for record in records:
        assert record["call.output"] == record["output"]
        assert record["call.output.grade"] == record["output"]["grade"]

    out = pipeline.folder / "out.csv"
    assert pipeline.cli("export", "-o", str(out), "--fields", "n,flag,call.output.grade") == 0
    lines = [line.split(",") for line in out.read_text().splitlines()]
    assert lines[0][:4] == ["id", "n", "flag", "call.output.grade"]
    assert [line[:3] for line in lines[1:3]] == [["g0", "0", "1"], ["g1", "1", "0"]]
    assert [line[3] for line in lines[1:]] == [r["output"]["grade"] for r in records]

    parquet = pipeline.folder / "out.parquet"
    assert pipeline.cli("export", "-o", str(parquet), "--flatten") == 0
    table = pq.read_table(parquet)
    types = {field.name: str(field.type) for field in table.schema}
    assert (types["n"], types["score"], types["flag"], types["tags"]) == (
        "int64", "double", "bool", "string")
    assert (types["call.output.grade"], types["call.output.why"]) == ("string", "string")
    got = table.to_pylist()
    assert [(r["n"], r["score"], r["flag"], json.loads(r["tags"])) for r in got[:2]] == [
        (0, 0.0, True, ["a", "0"]), (1, 0.25, False, ["a", "1"])]  # a list as its JSON
    assert [r["call.output.grade"] for r in got] == [r["output"]["grade"] for r in records]


def test_browse_on_postgres_names_the_view_to_open(
        make_pipeline: Any, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = make_pipeline(questions(3))
    pipeline.config["store"] = postgres_url
    assert pipeline.cli("browse") == 2
    err = capsys.readouterr().err
    assert "Datasette, which reads SQLite only" in err and "SELECT * FROM browse" in err


def test_a_session_holding_a_request_past_its_lease_is_ended(postgres_url: str) -> None:
    # a worker paused inside its commit: its transaction holds the request's row, past its
    # lease; another worker ends that session, and the request can be claimed again
    async def scenario() -> None:
        store = await PostgresStore.open(StoreURL(postgres_url))
        paused = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
        try:
            await store.start_run(Path("pipeline.yaml"), "test", "test")
            await store.queue.enqueue("call", "test", [("k1", "{}")])
            (held,) = await store.queue.claim("test", ["call"], 10, 30, [])
            assert await store.queue.end_stuck("test", ["call"], 0) == 0  # its lease stands
            await paused.execute("UPDATE work SET lease_until = now() - interval '1 minute'")
            await paused.execute("BEGIN")
            await paused.execute("UPDATE work SET state = 'done' WHERE token = %s",
                                 (held.token,))
            assert await store.queue.claim("test", ["call"], 10, 30, []) == []  # locked
            assert await store.queue.end_stuck("test", ["call"], 3600) == 0  # not yet
            assert await store.queue.end_stuck("test", ["call"], 0) == 1
            with pytest.raises(psycopg.OperationalError):
                await paused.execute("COMMIT")
            for _ in range(500):  # the server ends the session a moment after the signal
                if (again := await store.queue.claim("test", ["call"], 10, 30, [])):
                    break
                await asyncio.sleep(0.01)
            assert [claimed.key for claimed in again] == ["k1"]
        finally:
            await paused.close()
            await store.close()

    run_within(scenario())


def test_a_worker_whose_store_stays_gone_gives_up_once_not_at_every_statement(
        postgres_url: str, postgres_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the store dropped for good: the first statement waits RECONNECT_S for it, the ones
    # after (the group writer's among them) try once, and fail with the same clear error
    from flow.store.postgres import connect as connecting

    monkeypatch.setattr(connecting, "RECONNECT_S", 0.2)
    monkeypatch.setattr(connecting, "RECONNECT_WAIT_S", 0)
    tries: list[StoreURL] = []
    connect = connecting.connect

    async def counted(url: StoreURL, *args: Any, **kwargs: Any) -> Any:
        tries.append(url)
        return await connect(url, *args, **kwargs)

    async def scenario() -> None:
        store = await PostgresStore.open(StoreURL(postgres_url))
        store.worker_session = True
        monkeypatch.setattr(connecting, "connect", counted)
        try:
            await store.start_run(Path("pipeline.yaml"), "test", "test")
            name = postgres_url.split("?")[0].rsplit("/", 1)[1]
            with psycopg.connect(postgres_server, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            with pytest.raises(StoreError, match="lost the connection to the store"):
                await store.queue.heartbeat(30)
            assert tries  # it did wait for the store, once
            waited = len(tries)
            with pytest.raises(StoreError, match="lost the connection to the store"):
                await store.queue.left("test", ["call"])
            with pytest.raises(StoreError, match="lost the connection to the store"):
                await store.save(Settled("call", "test", "k1", utc_now(), None, [], []))
                await store.flush()
            assert len(tries) - waited <= 3  # a try each, no second wait
        finally:
            with contextlib.suppress(StoreError):
                await store.close()

    run_within(scenario())


def test_a_heartbeat_keeps_the_leases_it_can_and_never_waits_for_a_locked_row(
        postgres_url: str) -> None:
    # a row locked by a transaction (this worker's own commit of it, another's claim) is
    # not waited for: the beat held the worker's connection behind it, or deadlocked
    async def scenario() -> None:
        store = await PostgresStore.open(StoreURL(postgres_url))
        commit = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
        try:
            await store.start_run(Path("pipeline.yaml"), "test", "test")
            await store.queue.enqueue("call", "test", [("k1", "{}"), ("k2", "{}")])
            held = {c.key: c.token for c in await store.queue.claim("test", ["call"], 10, 1)}
            await commit.execute("BEGIN")
            await commit.execute("UPDATE work SET state = 'done' WHERE token = %s",
                                 (held["k1"],))
            async with asyncio.timeout(5):
                await store.queue.heartbeat(3600)
            cursor = await commit.execute(
                "SELECT request_key, lease_until > now() + interval '30 minutes' FROM work "
                "ORDER BY 1")
            assert await cursor.fetchall() == [("k1", False), ("k2", True)]
            await commit.execute("ROLLBACK")
        finally:
            await commit.close()
            await store.close()

    run_within(scenario())


def test_a_commit_that_fails_alike_on_every_new_connection_gives_up(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # an error the server gives every time (out of disk): the group is tried on a new
    # connection for RECONNECT_S, then fails clearly, where it was tried for good
    from flow.store.postgres import connect as connecting

    monkeypatch.setattr(connecting, "RECONNECT_S", 0.2)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   "BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; "
                   "END $$")

    async def scenario() -> None:
        store = await PostgresStore.open(StoreURL(postgres_url))
        store.worker_session = True
        try:
            await store.start_run(Path("pipeline.yaml"), "test", "test")
            await store._query("CREATE TRIGGER disk_full BEFORE INSERT ON attempts FOR EACH ROW "
                               "EXECUTE FUNCTION full_disk()", (), raw=True)
            attempt = Attempt(1, utc_now(), 1.0, 500, "error", "boom")
            with pytest.raises(StoreError, match="could not extend file"):
                await store.save(Settled("call", "test", "k1", utc_now(), None, [attempt],
                                         []))
        finally:
            with contextlib.suppress(StoreError):
                await store.close()

    run_within(scenario())


def test_a_statement_that_ends_its_session_every_time_fails_within_reconnect_s(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # each new connection is ended by the statement itself (as an admin tool killing
    # long queries would): taken again for RECONNECT_S at most, then a clear error
    from flow.store.postgres import connect as connecting

    monkeypatch.setattr(connecting, "RECONNECT_S", 0.3)
    monkeypatch.setattr(connecting, "RECONNECT_WAIT_S", 0.05)

    async def scenario() -> None:
        store = await PostgresStore.open(StoreURL(postgres_url))
        store.worker_session = True
        try:
            with pytest.raises(StoreError, match="cannot read"):
                await store._query("SELECT pg_terminate_backend(pg_backend_pid())", (),
                                   raw=True)
            assert (await store._query("SELECT 1", (), raw=True)) == [(1,)]  # and goes on
        finally:
            await store.close()

    run_within(scenario())
