"""The Batch API executor for the Responses API, and for a stage with a schema: the real
`openai` SDK against the simulator's Files and Batch API."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import questions

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


def test_a_batch_stage_with_a_schema_fails_broken_replies_without_reasks(
        make_pipeline: Any, batch_server: SimulatorThread) -> None:
    batch_server.config.schema_break_rate = 0.2
    schema = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
              "required": ["label"]}
    pipeline = make_pipeline(rows=questions(40), base_url=batch_server.url, post=[], call={
        "schema": schema, "executor": "batch", "batch": {"max_requests_per_batch": 40, **FAST}})
    assert pipeline.run() == 1
    failed = pipeline.query("SELECT error_class FROM results WHERE status = 'failed'")
    broken = batch_server.stats.schema_broken
    assert broken > 0 and failed == [("SchemaError",)] * broken
    assert batch_server.stats.requests == 0  # no re-ask went online
