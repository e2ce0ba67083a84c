"""Many workers on one PostgreSQL store: every item done once, whatever happens to a worker.

A real PostgreSQL server (`postgres_url`), real worker processes (`flow worker`) and the
simulator over loopback HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from conftest import API_KEY, Pipeline, questions, wait_for_requests

pytestmark = pytest.mark.slow


def shared(make_pipeline: Any, url: str, rows: int, base_url: str, **call: Any) -> Pipeline:
    pipeline = make_pipeline(questions(rows), base_url, call={"concurrency": 16, **call})
    pipeline.config["store"] = url
    pipeline.write()
    return pipeline


def workers(pipeline: Pipeline, count: int, *args: str) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen(
        [sys.executable, "-m", "flow", "worker", str(pipeline.file), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OPENAI_API_KEY": API_KEY}) for _ in range(count)]


def rows_of(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def wait_for_runs(url: str, count: int, within_s: float = 30) -> None:
    """Wait until `count` workers have started their runs on the store."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        ((running,),) = rows_of(url, "SELECT COUNT(*) FROM runs WHERE state = 'running'")
        if running >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{count} workers did not start within {within_s} s")


def outputs_once(url: str, items: int) -> None:
    """Every item has one output, done, made from a reply to its own request."""
    ((count, done, distinct),) = rows_of(url, "SELECT COUNT(*), COUNT(*) FILTER (WHERE status "
                                              "= 'done'), COUNT(DISTINCT item_id) FROM outputs")
    assert (count, done, distinct) == (items, items, items)
    ((paying,),) = rows_of(url, "SELECT COUNT(*) FROM outputs WHERE bought <> 0")
    assert paying == items


def test_three_workers_do_every_item_once_and_a_killed_one_costs_its_flight(
        make_pipeline: Any, postgres_url: str, simulator: Any) -> None:
    simulator.config.latency_ms = 20
    pipeline = shared(make_pipeline, postgres_url, 1000, simulator.url)
    assert pipeline.cli("plan") == 0
    started = workers(pipeline, 3, "--lease-s", "2")
    wait_for_requests(simulator, 250)
    started[0].send_signal(signal.SIGKILL)
    for child in started[1:]:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    outputs_once(postgres_url, 1000)
    # the killed worker had at most its concurrency in flight: those are sent again
    assert 1000 <= simulator.stats.requests <= 1000 + 16
    ((replies,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM responses")
    assert replies == 1000  # a reply that came to a dead worker was never committed
    ((left,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM work WHERE state <> 'done'")
    assert left == 0


def test_a_worker_paused_past_its_lease_has_its_results_refused(
        make_pipeline: Any, postgres_url: str, simulator: Any) -> None:
    # long enough that the paused worker's requests are in flight when it stops
    simulator.config.latency_ms = 100
    pipeline = shared(make_pipeline, postgres_url, 100, simulator.url, concurrency=8)
    assert pipeline.cli("plan") == 0
    (paused,) = workers(pipeline, 1, "--lease-s", "1")
    wait_for_requests(simulator, 4)
    paused.send_signal(signal.SIGSTOP)  # its requests in flight: their replies wait
    try:
        (other,) = workers(pipeline, 1, "--lease-s", "1")
        try:
            _, err = other.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            print(rows_of(postgres_url, "SELECT pid, state, query FROM pg_stat_activity"))
            print(rows_of(postgres_url, "SELECT state, count(*), min(lease_until) < now(), "
                                        "max(worker) FROM work GROUP BY state"))
            other.kill()
            print(other.communicate())
            raise
        assert other.returncode == 0, err
    finally:
        paused.send_signal(signal.SIGCONT)
    _, err = paused.communicate(timeout=60)
    assert paused.returncode == 0, err
    outputs_once(postgres_url, 100)
    ((replies,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM responses")
    late = replies - 100
    assert late >= 1  # the paused worker's replies: paid, kept, used by no item
    ((unused,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM responses WHERE id NOT IN "
                                         "(SELECT response_id FROM outputs)")
    assert unused == late
    assert f"{late:,} results came after this worker's lease had passed" in err


def test_plan_killed_midway_and_run_again_records_each_item_once(
        make_pipeline: Any, postgres_url: str, simulator: Any) -> None:
    pipeline = shared(make_pipeline, postgres_url, 10_000, simulator.url)
    child = subprocess.Popen([sys.executable, "-m", "flow", "plan", str(pipeline.file)],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ((count,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM items")
        except psycopg.Error:
            count = 0
        if count >= 2000:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert pipeline.cli("plan") == 0
    ((items, distinct),) = rows_of(postgres_url, "SELECT COUNT(*), COUNT(DISTINCT item_id) "
                                                 "FROM items")
    ((queued,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM work")
    assert items == distinct == queued == 10_000


def test_three_workers_share_one_limit_and_meet_no_429s(
        make_pipeline: Any, postgres_url: str, simulator: Any) -> None:
    # at most 10 requests in any one second: three workers that each paced themselves at
    # the limit would send three times that
    simulator.config.rpm, simulator.config.window = 600, "sliding-1s"
    simulator.config.latency_ms = 50
    pipeline = shared(make_pipeline, postgres_url, 30, simulator.url, rpm=600)
    assert pipeline.cli("plan") == 0
    for child in workers(pipeline, 3):
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    outputs_once(postgres_url, 30)
    # three workers pacing themselves alone would send 30 a second: 20 refused in the first
    assert simulator.stats.by_status[429] <= 1
    assert simulator.stats.requests <= 31
    ((limit_rows,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM limits")
    assert limit_rows == 1  # one endpoint, key and model: one limit, shared


def test_workers_go_on_when_the_database_restarts(
        make_pipeline: Any, postgres_url: str, postgres_server: str, simulator: Any,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    import pgserver

    simulator.config.latency_ms = 20
    pipeline = shared(make_pipeline, postgres_url, 400, simulator.url, concurrency=8)
    assert pipeline.cli("plan") == 0
    started = workers(pipeline, 2)
    wait_for_requests(simulator, 100)
    wait_for_runs(postgres_url, 2)  # both workers connected: the restart meets them both
    folder = postgres_server.split("host=")[1]
    server = pgserver.get_server(folder, cleanup_mode="stop")
    pid = server.get_pid()
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # a fast shutdown: every session ends
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    server.ensure_postgres_running()
    for child in started:
        _, err = child.communicate(timeout=90)
        assert child.returncode == 0, err
    outputs_once(postgres_url, 400)
    # what was in flight when the server went down is all that was sent twice
    assert simulator.stats.requests <= 400 + 2 * 8


def test_the_budget_counts_every_workers_spend(
        make_pipeline: Any, postgres_url: str, simulator: Any) -> None:
    simulator.config.latency_ms = 10
    price = {"input_per_1m": 1000, "output_per_1m": 1000}  # a few cents a request
    pipeline = shared(make_pipeline, postgres_url, 400, simulator.url, concurrency=4,
                      max_cost_usd=1.0, price=price)
    assert pipeline.cli("plan") == 0
    started = workers(pipeline, 2)
    for child in started:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 1, err
        assert "max_cost_usd" in err
    ((spent, replies),) = rows_of(postgres_url, "SELECT SUM(cost_usd), COUNT(*) FROM responses")
    ((most,),) = rows_of(postgres_url, "SELECT MAX(cost_usd) FROM responses")
    # over the cap by no more than, in each worker, what was in flight when it was reached
    # and a claim's worth sent on the total it read before that claim (the other's spend
    # since is not in it): twice the concurrency each (seen: 8.2 requests' worth, over
    # the in-flight 8, on a loaded machine)
    assert 1.0 <= spent <= 1.0 + 2 * 2 * 4 * most
    assert replies < 400
    ((pending,),) = rows_of(postgres_url, "SELECT COUNT(*) FROM work WHERE state = 'pending'")
    assert pending == 400 - replies  # what was not sent waits for a higher cap


def test_workers_reask_replies_that_break_the_schema(
        make_pipeline: Any, postgres_url: str, simulator: Any) -> None:
    simulator.config.schema_break_rate = 0.2
    schema = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
              "required": ["label"]}
    pipeline = shared(make_pipeline, postgres_url, 60, simulator.url, schema=schema)
    pipeline.config["post"] = []
    pipeline.write()
    assert pipeline.cli("plan") == 0
    assert pipeline.cli("worker") == 0
    broken = simulator.stats.schema_broken
    assert broken > 0 and simulator.stats.requests == 60 + broken
    outputs_once(postgres_url, 60)
    labels = rows_of(postgres_url, "SELECT output FROM outputs")
    assert all('"label"' in output for (output,) in labels)
    # the broken replies kept beside their re-asks, each bought once
    assert rows_of(postgres_url, "SELECT COUNT(*), COUNT(DISTINCT request_key) FROM "
                                 "responses") == [(60 + broken, 60 + broken)]
