"""`call.endpoint: responses`: the Responses API through the `openai` SDK against the
simulator, end to end through the CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flow.simulator import SimulatorThread

CLASSIFY = [{"role": "system", "content": "Classify the sentiment of the text as positive, "
             "negative or neutral. Reply with one word."},
            {"role": "user", "content": "{{ question }}"}]


def _rows(count: int) -> list[dict[str, Any]]:
    return [{"id": f"t{i:03d}", "question": f"Review number {i} of the new phone"}
            for i in range(count)]


def test_responses_and_chat_give_the_same_outputs(make_pipeline: Any,
                                                  simulator: SimulatorThread,
                                                  capsys: Any) -> None:
    exported = {}
    for endpoint in ("chat", "responses"):
        pipeline = make_pipeline(rows=_rows(30), base_url=simulator.url, post=["strip", "lower"],
                                 call={"endpoint": endpoint, "messages": CLASSIFY},
                                 store=f"{endpoint}.db")
        assert pipeline.run() == 0
        exported[endpoint] = pipeline.export(capsys)
        (request, body), = pipeline.query("SELECT request, body FROM responses LIMIT 1")
        sent, got = json.loads(request), json.loads(body)
        if endpoint == "responses":
            assert "input" in sent and "messages" not in sent and got["object"] == "response"
            (tokens,), = pipeline.query("SELECT MIN(prompt_tokens * completion_tokens) "
                                        "FROM responses")
            assert tokens > 0
    assert simulator.stats.requests == 60
    assert exported["chat"] == exported["responses"]
    assert {row["output"] for row in exported["responses"]} <= {"positive", "negative",
                                                               "neutral"}


def test_responses_schema_is_text_format_and_reasked(make_pipeline: Any,
                                                      simulator: SimulatorThread) -> None:
    simulator.config.schema_break_rate = 0.2
    schema = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]},
                                               "score": {"type": "number"}},
              "required": ["label", "score"]}
    pipeline = make_pipeline(rows=_rows(40), base_url=simulator.url, post=[],
                             call={"endpoint": "responses", "schema": schema})
    assert pipeline.run() == 0
    broken = simulator.stats.schema_broken
    assert broken > 0 and simulator.stats.requests == 40 + broken
    (request,), = pipeline.query("SELECT request FROM responses LIMIT 1")
    form = json.loads(request)["text"]["format"]
    assert form["type"] == "json_schema" and form["strict"] is True
    outputs = [json.loads(o) for (o,) in pipeline.query("SELECT output FROM results")]
    assert len(outputs) == 40 and all(o["label"] in ("pos", "neg") for o in outputs)
    (longest,), = pipeline.query("SELECT MAX(json_array_length(request, '$.input')) "
                                 "FROM responses")
    assert longest == 4  # a re-ask: the input, the reply, the mismatch


def test_responses_cut_short_is_flagged_and_a_post_edit_calls_nothing(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = [{"id": "a", "question": "fine"}, {"id": "b", "question": "[sim:finish=length] x"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"endpoint": "responses",
                                   "params": {"max_output_tokens": 50, "temperature": 0}})
    assert pipeline.run() == 0
    first = {row["id"]: row for row in pipeline.export(capsys)}
    assert first["b"]["truncated"] is True and first["a"]["truncated"] is False
    pipeline.config["post"] = ["strip", "lower"]
    assert pipeline.run() == 0
    assert simulator.stats.requests == 2  # outputs made again from the stored replies
    again = {row["id"]: row for row in pipeline.export(capsys)}
    assert again["a"]["output"] == first["a"]["output"].lower()


@pytest.mark.parametrize(("call", "expected"), [
    ({"endpoint": "responses", "params": {"max_tokens": 10}}, "names it max_output_tokens"),
    ({"endpoint": "responses", "params": {"max_output_tokns": 10}},
     "did you mean 'max_output_tokens'"),
    ({"endpoint": "responses", "params": {"response_format": {"type": "json_object"}}},
     "takes it as text: {format: ...}"),
    ({"endpoint": "completions"}, "call.endpoint"),
])
def test_responses_config_errors_exit_2(make_pipeline: Any, simulator: SimulatorThread,
                                        capsys: Any, call: dict[str, Any],
                                        expected: str) -> None:
    pipeline = make_pipeline(base_url=simulator.url, call=call)
    assert pipeline.run() == 2
    assert expected in capsys.readouterr().err
    assert simulator.stats.requests == 0
