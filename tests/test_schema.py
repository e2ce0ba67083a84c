"""Structured outputs: `call.schema` sent, replies checked, mismatches re-asked; end to end
through the CLI and the `openai` SDK against the simulator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import flow_process, interrupt, kill_mid_run, questions, wait_for_requests

from flow.schema_check import first_mismatch
from flow.simulator import SimulatorThread

MODEL = '''from typing import Literal
from pydantic import BaseModel


class Grade(BaseModel):
    grade: int
    reason: str
    level: Literal["low", "medium", "high"]
'''
GRADE_SCHEMA = {"type": "object", "title": "grade",
                "properties": {"grade": {"type": "integer", "minimum": 1, "maximum": 5},
                               "label": {"enum": ["good", "bad"]}},
                "required": ["grade", "label"]}


def _model_pipeline(make_pipeline: Any, simulator: SimulatorThread, module: str, count: int,
                    **call: Any) -> Any:
    pipeline = make_pipeline(
        rows=[{"id": f"q{i:03d}", "question": f"Grade answer {i}"} for i in range(count)],
        base_url=simulator.url, post=[],
        call={"schema": {"python": f"{module}:Grade"}, **call})
    (pipeline.folder / f"{module}.py").write_text(MODEL)
    return pipeline


def test_broken_replies_are_reasked_and_every_item_ends_valid(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    simulator.config.schema_break_rate = 0.1
    pipeline = _model_pipeline(make_pipeline, simulator, "grades_reask", 80)
    assert pipeline.run() == 0
    broken = simulator.stats.schema_broken
    assert broken > 0  # the seeded rate breaks some of 80
    assert simulator.stats.requests == 80 + broken
    outputs = [json.loads(text) for (text,) in pipeline.query(
        "SELECT output FROM results WHERE status = 'done'")]
    assert len(outputs) == 80
    assert all(set(o) == {"grade", "reason", "level"} and isinstance(o["grade"], int)
               for o in outputs)
    # every paid reply is kept and counted, the re-asked ones too
    (replies, paid), = pipeline.query("SELECT COUNT(*), SUM(cost_usd) FROM responses")
    (bought,), = pipeline.query("SELECT SUM(cost_usd) FROM results")
    assert replies == 80 + broken and paid > bought
    reasked = [item for (item,) in pipeline.query(
        "SELECT results.item_id FROM results JOIN responses ON responses.id = "
        "results.response_id WHERE json_array_length(responses.request, '$.messages') = 4")]
    assert len(reasked) == broken
    capsys.readouterr()
    assert pipeline.cli("show", reasked[0]) == 0
    shown = json.loads(capsys.readouterr().out)
    asked = shown["request"]["messages"]
    assert asked[2]["role"] == "assistant" and "did not match" in asked[3]["content"]
    assert "Field required" in asked[3]["content"]
    before = shown["replies_before_reask"]
    assert len(before) == 1 and before[0]["cost_usd"] > 0
    first = json.loads(before[0]["response"]["choices"][0]["message"]["content"])
    assert first == json.loads(asked[2]["content"]) and "grade" not in first
    # a second run calls nothing
    assert pipeline.run() == 0
    assert simulator.stats.requests == 80 + broken


def test_a_post_edit_keeps_the_reasked_replies_and_pays_nothing(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    simulator.config.schema_break_rate = 0.1
    pipeline = _model_pipeline(make_pipeline, simulator, "grades_edit", 80,
                               stop_after_failures=0)
    assert pipeline.run() == 0
    broken = simulator.stats.schema_broken
    assert broken > 0
    before = dict(pipeline.query("SELECT item_id, response_id FROM results"))
    # a post step added after the schema fails every item; fixed, it makes every output again
    # from the stored replies: for a re-asked item, the re-ask's, found by its request
    tagging = pipeline.folder / "tagging.py"
    tagging.write_text("def tag(value):\n    raise ValueError('not yet')\n")
    pipeline.config["post"] = [{"python": "tagging:tag"}]
    assert pipeline.run() == 1
    tagging.write_text("def tag(value):\n    return {**value, 'tagged': True}\n")
    assert pipeline.run() == 0
    assert simulator.stats.requests == 80 + broken  # the re-asks' replies read back, not bought
    outputs = pipeline.query("SELECT item_id, status, output, response_id FROM results")
    assert all(status == "done" and json.loads(output)["tagged"] for _, status, output, _ in
               outputs)
    assert {item: reply for item, _, _, reply in outputs} == before  # the same replies


def test_reasks_count_against_the_call_limit_and_wait_for_the_next_run(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    simulator.config.schema_break_rate = 0.1
    pipeline = _model_pipeline(make_pipeline, simulator, "grades_limit", 80)
    pipeline.run("--limit", "80")
    broken = simulator.stats.schema_broken
    assert broken > 0 and simulator.stats.requests == 80
    # a broken reply whose re-ask the limit held back is kept, its item pending, not failed
    assert pipeline.query("SELECT COUNT(*) FROM responses") == [(80,)]
    assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'failed'") == [(0,)]
    assert pipeline.run() == 0
    # each first request bought once; the next run sent the re-asks and what the limit left
    assert simulator.stats.requests == 80 + broken
    assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'done'") == [(80,)]
    assert pipeline.query("SELECT COUNT(*) - COUNT(DISTINCT request_key) FROM responses") == [
        (0,)]


def test_a_stop_ends_the_waits_of_reasks_a_run_sends_before_any_call(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    simulator.config.schema_break_rate = 0.2
    pipeline = _model_pipeline(make_pipeline, simulator, "grades_stop", 40)
    pipeline.run("--limit", "40")  # every item asked; the broken replies' re-asks held back
    broken = simulator.stats.schema_broken
    assert broken > 1
    # the next run has only those re-asks to send, one a minute: the first goes, the others
    # wait for the limiter, and a stop must give them back at once, not after drain_s
    pipeline.config["call"].update(rpm=1, drain_s=600)
    child = flow_process(pipeline)
    wait_for_requests(simulator, 41)
    assert interrupt(child) == 130
    assert simulator.stats.requests == 41
    assert pipeline.query("SELECT status, COUNT(*) FROM results GROUP BY status") == [
        ("done", 40 - broken + 1), ("pending", broken - 1)]


def test_a_kill_while_a_reask_is_on_its_way_keeps_the_reply_it_corrects(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    simulator.config.schema_break_rate = 1.0  # every first reply breaks, no re-ask's does
    simulator.config.latency_ms = 300  # the kill lands while the re-ask waits for its reply
    pipeline = make_pipeline(rows=questions(1), base_url=simulator.url, post=[], call={
        "schema": {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
                   "required": ["label"]}, "concurrency": 1})
    kill_mid_run(pipeline, simulator, 2)
    # the broken reply was paid for: it is on disk before its re-ask goes out
    assert pipeline.query("SELECT COUNT(*) FROM responses") == [(1,)]
    simulator.config.latency_ms = 0
    assert pipeline.run() == 0
    # the resumed run sends only the re-ask the kill cut off, never the first request again
    assert simulator.stats.requests == 3
    assert pipeline.query("SELECT COUNT(*), COUNT(DISTINCT request_key) FROM responses") == [
        (2, 2)]
    assert pipeline.query("SELECT status, COUNT(*) FROM results GROUP BY status") == [
        ("done", 1)]


def test_reasks_left_for_the_next_run_go_out_together(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    simulator.config.schema_break_rate = 0.3
    simulator.config.latency_ms = 50
    pipeline = _model_pipeline(make_pipeline, simulator, "grades_later", 40, concurrency=40)
    # all 40 calls are out before the first reply: the limit holds back every re-ask
    pipeline.run("--limit", "40")
    broken = simulator.stats.schema_broken
    assert broken > 1 and simulator.stats.requests == 40
    simulator.stats.most_waiting = 0
    assert pipeline.run() == 0
    assert simulator.stats.requests == 40 + broken
    # the kept replies' re-asks went out as the stage sends calls, together, not one by one
    # (the run's first request goes alone, to hear the server's limits)
    assert simulator.stats.most_waiting >= broken - 1


def test_without_reasks_exactly_the_broken_replies_fail_with_schema_error(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    simulator.config.schema_break_rate = 0.1
    pipeline = _model_pipeline(make_pipeline, simulator, "grades_noreask", 80,
                               schema_retries=0)
    assert pipeline.run() == 1
    failed = pipeline.query("SELECT error_class, error FROM results WHERE status = 'failed'")
    assert len(failed) == simulator.stats.schema_broken > 0
    assert simulator.stats.requests == 80
    assert all(c == "SchemaError" and "does not match the schema" in e for c, e in failed)


def test_show_lists_every_reply_an_exchange_broke_on_with_two_reasks(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    # every reply breaks, the re-asks' too: each item asks three times
    simulator.config.schema_break_rate = simulator.config.schema_rebreak_rate = 1.0
    pipeline = _model_pipeline(make_pipeline, simulator, "grades_twice", 3, schema_retries=2,
                               stop_after_failures=0)
    assert pipeline.run() == 1
    assert simulator.stats.requests == 9
    capsys.readouterr()
    assert pipeline.cli("show", "q001") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["error_class"] == "SchemaError"
    before = shown["replies_before_reask"]
    asked = shown["request"]["messages"]
    assert len(before) == 2 and len(asked) == 6  # the question, then two broken replies
    # each broken reply is the one its re-ask quoted back, in order; all three paid
    assert [b["response"]["choices"][0]["message"]["content"] for b in before] == [
        asked[2]["content"], asked[4]["content"]]
    ids = [b["response_id"] for b in before] + [shown["response_id"]]
    assert len(set(ids)) == 3
    (paid,), = pipeline.query(f"SELECT SUM(cost_usd) FROM responses WHERE id IN "
                              f"({','.join(map(str, ids))})")
    assert sum(b["cost_usd"] for b in before) + shown["cost_usd"] == pytest.approx(paid)
    assert paid > 0


def test_inline_schema_is_sent_strict_and_checked(make_pipeline: Any,
                                                   simulator: SimulatorThread) -> None:
    pipeline = make_pipeline(base_url=simulator.url, post=[], call={"schema": GRADE_SCHEMA})
    assert pipeline.run() == 0
    (request,), = pipeline.query("SELECT request FROM responses LIMIT 1")
    sent = json.loads(request)["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["additionalProperties"] is False
    for (text,) in pipeline.query("SELECT output FROM results"):
        value = json.loads(text)
        assert 1 <= value["grade"] <= 5 and value["label"] in ("good", "bad")


def test_schema_file_with_optional_property_is_sent_not_strict(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    schema = {**GRADE_SCHEMA, "required": ["grade"]}
    pipeline = make_pipeline(base_url=simulator.url, post=[],
                             call={"schema": "schemas/grade.json"})
    (pipeline.folder / "schemas").mkdir()
    (pipeline.folder / "schemas" / "grade.json").write_text(json.dumps(schema))
    assert pipeline.run() == 0
    (request,), = pipeline.query("SELECT request FROM responses LIMIT 1")
    assert json.loads(request)["response_format"]["json_schema"]["strict"] is False


@pytest.mark.parametrize(("schema", "params", "expected"), [
    ("missing.json", {}, "call.schema: missing.json: no such file"),
    ({"python": "nowhere_module:Grade"}, {}, "call.schema.python: cannot import"),
    ({"type": "array", "items": {"type": "string"}}, {}, "need an object at the top"),
    (GRADE_SCHEMA, {"response_format": {"type": "json_object"}},
     "call.params.response_format: call.schema sets it"),
])
def test_unusable_schema_exits_2_naming_the_key(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any, schema: Any,
        params: dict[str, Any], expected: str) -> None:
    pipeline = make_pipeline(base_url=simulator.url, call={"schema": schema, "params": params})
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert expected in err and "pipeline.yaml" in err
    assert simulator.stats.requests == 0


@pytest.mark.parametrize(("value", "expected"), [
    ({"grade": 3, "label": "good"}, None),
    ({"grade": 3}, "$: missing required property 'label'"),
    ({"grade": "3", "label": "good"}, "$.grade: expected integer"),
    ({"grade": 9, "label": "good"}, "$.grade: 9 is more than 5"),
    ({"grade": 2, "label": "meh"}, "$.label: expected one of"),
    ({"grade": True, "label": "bad"}, "$.grade: expected integer"),
])
def test_first_mismatch_names_the_path(value: Any, expected: str | None) -> None:
    found = first_mismatch(value, GRADE_SCHEMA)
    assert found == expected if expected is None else found is not None and found.startswith(
        expected)


def test_first_mismatch_follows_refs_and_closed_objects() -> None:
    schema = {"type": "object", "$defs": {"tag": {"type": "object", "properties": {
        "name": {"type": "string"}}, "required": ["name"], "additionalProperties": False}},
        "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"},
                                "minItems": 1}}, "required": ["tags"]}
    assert first_mismatch({"tags": [{"name": "a"}]}, schema) is None
    assert first_mismatch({"tags": []}, schema) == "$.tags: fewer than 1 items"
    assert first_mismatch({"tags": [{"name": "a", "x": 1}]}, schema) == \
        "$.tags[0]: unexpected property 'x'"


def test_export_flatten_gives_each_field_of_the_object_a_column(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    import pyarrow.parquet as pq
    pipeline = make_pipeline(base_url=simulator.url, post=[], call={"schema": GRADE_SCHEMA})
    assert pipeline.run() == 0
    out = pipeline.folder / "graded.parquet"
    assert pipeline.cli("export", "-o", str(out), "--no-input", "--flatten") == 0
    table = pq.read_table(out)
    assert {"call.output.grade", "call.output.label"} <= set(table.column_names)
    assert str(table.schema.field("call.output.grade").type) == "int64"
    rows = table.to_pylist()
    assert all(r["call.output.grade"] == json.loads(r["output"])["grade"] for r in rows)
    capsys.readouterr()
    assert pipeline.cli("export", "--flatten", "--no-input") == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["call.output.label"] in ("good", "bad")
