"""The Batch API executor for the Responses API, and for a stage with a schema: the real
`openai` SDK against the simulator's Files and Batch API."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import flow_process, interrupt, questions, wait_for_requests

from flow.simulator import SimulatorConfig, SimulatorThread

FAST = {"first_poll_s": 0.01, "max_poll_s": 0.05, "gather_s": 0.3, "create_grace_s": 0}
CLASSIFY = [{"role": "system", "content": "Classify the sentiment of the text as positive, "
             "negative or neutral. Reply with one word."},
            {"role": "user", "content": "{{ question }}"}]


@pytest.fixture
def batch_server() -> Any:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2)) as server:
        yield server


def test_responses_through_batches_match_chat_online(make_pipeline: Any,
                                                     batch_server: SimulatorThread,
                                                     capsys: Any) -> None:
    batched = make_pipeline(rows=questions(60), base_url=batch_server.url, store="batch.db",
                            post=["strip", "lower"], call={
                                "endpoint": "responses", "messages": CLASSIFY,
                                "executor": "batch",
                                "batch": {"max_requests_per_batch": 30, **FAST}})
    assert batched.run() == 0
    assert sorted(batch_server.stats.batch_creates.values()) == [1, 1]
    assert batch_server.stats.requests == 0  # nothing went online
    bodies = [json.loads(b) for (b,) in batched.query("SELECT body FROM responses")]
    assert len(bodies) == 60 and {b["object"] for b in bodies} == {"response"}
    (tokens,), = batched.query("SELECT MIN(prompt_tokens * completion_tokens) FROM responses")
    assert tokens > 0
    from_batches = batched.export(capsys)
    online = make_pipeline(rows=questions(60), base_url=batch_server.url, store="chat.db",
                           post=["strip", "lower"], call={"messages": CLASSIFY})
    assert online.run() == 0
    assert online.export(capsys) == from_batches


SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
          "required": ["label"]}


def test_a_batch_stage_with_a_schema_reasks_broken_lines_online(
        make_pipeline: Any, batch_server: SimulatorThread) -> None:
    batch_server.config.schema_break_rate = 0.2
    pipeline = make_pipeline(rows=questions(40), base_url=batch_server.url, post=[], call={
        "schema": SCHEMA, "executor": "batch", "batch": {"max_requests_per_batch": 40, **FAST}})
    assert pipeline.run() == 0
    broken = batch_server.stats.schema_broken
    assert broken > 0
    assert batch_server.stats.requests == broken  # each broken line re-asked once, online
    # those online calls are the run's calls, as every other online call is
    assert pipeline.query("SELECT calls_made FROM runs") == [(broken,)]
    outputs = [json.loads(o) for (o,) in pipeline.query(
        "SELECT output FROM results WHERE status = 'done'")]
    assert len(outputs) == 40 and all(o["label"] in ("pos", "neg") for o in outputs)
    # the broken lines are kept (at batch prices), the re-asks beside them
    assert pipeline.query("SELECT COUNT(*), COUNT(batch_id) FROM responses") == [
        (40 + broken, 40)]
    assert pipeline.run() == 0  # nothing left to ask
    assert batch_server.stats.requests == broken
    assert sum(batch_server.stats.batch_creates.values()) == 1


def test_items_that_render_one_request_share_one_batch_line_and_its_reask(
        make_pipeline: Any, batch_server: SimulatorThread) -> None:
    batch_server.config.schema_break_rate = 0.2
    rows = [{"id": f"r{i:02d}", "question": f"What is {i % 20}?"} for i in range(40)]
    pipeline = make_pipeline(rows=rows, base_url=batch_server.url, post=[], call={
        "schema": SCHEMA, "executor": "batch", "batch": {"max_requests_per_batch": 40, **FAST}})
    assert pipeline.run() == 0
    broken = batch_server.stats.schema_broken
    assert broken > 0 and batch_server.stats.batch_lines == 20
    assert batch_server.stats.requests == broken  # one online re-ask per broken line
    assert pipeline.query("SELECT COUNT(*), COUNT(batch_id) FROM responses") == [
        (20 + broken, 20)]
    assert pipeline.query("SELECT status, COUNT(*) FROM results GROUP BY status") == [
        ("done", 40)]


def test_a_stop_ends_the_reasks_waiting_for_the_limiter_at_once(
        make_pipeline: Any, batch_server: SimulatorThread) -> None:
    batch_server.config.schema_break_rate = 0.2
    # one request a minute: the first re-ask goes out, the others wait for the limiter, and
    # a stop must give them back at once rather than wait out drain_s
    pipeline = make_pipeline(rows=questions(40), base_url=batch_server.url, post=[], call={
        "schema": SCHEMA, "rpm": 1, "drain_s": 600, "executor": "batch",
        "batch": {"max_requests_per_batch": 40, **FAST}})
    child = flow_process(pipeline)
    wait_for_requests(batch_server, 1)
    assert interrupt(child) == 130
    broken = batch_server.stats.schema_broken
    assert broken > 1 and batch_server.stats.requests == 1
    # every line kept; the broken ones not re-asked are pending, not failed
    assert pipeline.query("SELECT COUNT(*), COUNT(batch_id) FROM responses") == [(41, 40)]
    assert pipeline.query("SELECT status, COUNT(*) FROM results GROUP BY status") == [
        ("done", 40 - broken + 1), ("pending", broken - 1)]


def test_reasks_under_a_cap_end_when_many_items_share_each_line(
        make_pipeline: Any, batch_server: SimulatorThread) -> None:
    batch_server.config.schema_break_rate = 1.0
    # 40 items, 2 requests: 2 lines. The cap fits the batch, and the re-asks once it is paid
    rows = [{"id": f"r{i:02d}", "question": f"What is {i % 2}?"} for i in range(40)]
    pipeline = make_pipeline(rows=rows, base_url=batch_server.url, post=[], call={
        "schema": SCHEMA, "executor": "batch", "params": {"max_tokens": 20},
        "max_cost_usd": 0.00003, "batch": {"max_requests_per_batch": 40, **FAST}})
    child = flow_process(pipeline)  # a child: the run waited forever for 38 calls never sent
    try:
        child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0
    assert batch_server.stats.requests == 2  # both lines re-asked online
    assert pipeline.query("SELECT status, COUNT(*) FROM results GROUP BY status") == [
        ("done", 40)]


def test_a_line_no_item_waits_on_is_kept_and_not_reasked(
        make_pipeline: Any, batch_server: SimulatorThread) -> None:
    batch_server.config.schema_break_rate = 0.3
    pipeline = make_pipeline(rows=questions(40), base_url=batch_server.url, post=[], call={
        "schema": SCHEMA, "executor": "batch", "batch": {"max_requests_per_batch": 40, **FAST}})
    assert pipeline.run("--detach") == 0
    # the prompt edited while the batch runs: its lines answer requests no item renders now
    pipeline.config["call"]["messages"][0]["content"] = "Answer very briefly."
    assert pipeline.run() == 0
    assert batch_server.stats.batch_lines == 80
    # every online call is a re-ask some item needed, and every one is kept
    reasks = pipeline.query("SELECT COUNT(*) FROM responses WHERE batch_id IS NULL")
    assert reasks == [(batch_server.stats.requests,)]
    assert pipeline.query("SELECT COUNT(*) FROM responses WHERE batch_id IS NOT NULL") == [(80,)]
    assert pipeline.query("SELECT status, COUNT(*) FROM results GROUP BY status") == [
        ("done", 40)]


def test_a_batch_stage_without_reasks_fails_exactly_the_broken_lines(
        make_pipeline: Any, batch_server: SimulatorThread) -> None:
    batch_server.config.schema_break_rate = 0.2
    pipeline = make_pipeline(rows=questions(40), base_url=batch_server.url, post=[], call={
        "schema": SCHEMA, "schema_retries": 0, "executor": "batch",
        "batch": {"max_requests_per_batch": 40, **FAST}})
    assert pipeline.run() == 1
    failed = pipeline.query("SELECT error_class FROM results WHERE status = 'failed'")
    broken = batch_server.stats.schema_broken
    assert broken > 0 and failed == [("SchemaError",)] * broken
    assert batch_server.stats.requests == 0  # no re-ask went online
