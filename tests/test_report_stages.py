"""The read commands on a chain of stages: status per stage, failures where they happened,
every stage of an item in `show`, and exports of any stage, end to end against the simulator."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from conftest import Pipeline

from flow.cli import main
from flow.simulator import SimulatorThread

ANSWER = {"name": "answer",
          "messages": [{"role": "user", "content": "{{ question }}"}],
          "post": ["strip"]}
GRADE = {"name": "grade",
         "when": "{{ not skip }}",
         "messages": [{"role": "system", "content": 'Grade the answer from 1 to 5. Reply with '
                                                    'a JSON object {"grade": n, "why": "..."}.'},
                      {"role": "user", "content": "{% if fail_grade %}[sim:status=400] "
                                                  "{% endif %}Q: {{ question }}\n"
                                                  "A: {{ answer.output }}"}],
         "params": {"response_format": {"type": "json_object"}},
         "post": ["json"]}
# ok: done at both stages; bad: fails at answer; skip: `when:` false at grade; late: fails
# at grade
ROWS = [{"id": "ok", "question": "What is 1 plus 1?", "skip": False, "fail_grade": False},
        {"id": "bad", "question": "[sim:status=400] Who?", "skip": False, "fail_grade": False},
        {"id": "skip", "question": "What is 2 plus 2?", "skip": True, "fail_grade": False},
        {"id": "late", "question": "What is 3 plus 3?", "skip": False, "fail_grade": True}]


def chained(make_pipeline: Any, simulator: SimulatorThread,
            stages: tuple[dict[str, Any], ...] = (ANSWER, GRADE)) -> Pipeline:
    """A chain over `ROWS` against the simulator: answer, then grade the answer."""
    pipeline: Pipeline = make_pipeline(rows=ROWS, base_url=simulator.url)
    call = pipeline.config.pop("call")
    del pipeline.config["post"]
    pipeline.config["defaults"] = {key: call[key] for key in (
        "model", "base_url", "concurrency", "timeout_s", "retry")}
    pipeline.config["stages"] = [dict(stage) for stage in stages]
    return pipeline


@pytest.fixture
def ran(make_pipeline: Any, simulator: SimulatorThread) -> Pipeline:
    """The chain, run once: `bad` and `late` failed, so the run exits 1."""
    pipeline = chained(make_pipeline, simulator)
    assert pipeline.run() == 1
    return pipeline


def out_of(pipeline: Pipeline, capsys: pytest.CaptureFixture[str], command: str,
           *args: str) -> str:
    capsys.readouterr()
    assert pipeline.cli(command, *args) == 0
    return capsys.readouterr().out


def records(pipeline: Pipeline, capsys: pytest.CaptureFixture[str],
            *args: str) -> dict[str, dict[str, Any]]:
    lines = out_of(pipeline, capsys, "export", *args).splitlines()
    return {record["id"]: record for record in map(json.loads, lines)}


def test_status_counts_the_chain_end_and_each_stage(ran: Pipeline, capsys: Any) -> None:
    status = json.loads(out_of(ran, capsys, "status", "--json"))
    assert (status["items"], status["done"], status["failed"], status["skipped"],
            status["pending"]) == (4, 1, 2, 1, 0)
    assert status["failed_by_error_class"] == {"BadRequestError": 2}
    answer, grade = status["stages"]
    assert {k: answer[k] for k in ("stage", "done", "failed", "pending", "skipped",
                                   "failed_here")} == {
        "stage": "answer", "done": 3, "failed": 1, "pending": 0, "skipped": 0,
        "failed_here": 1}
    assert {k: grade[k] for k in ("stage", "done", "failed", "pending", "skipped",
                                  "failed_here")} == {
        "stage": "grade", "done": 1, "failed": 2, "pending": 0, "skipped": 1,
        "failed_here": 1}
    # what each stage's current results bought: answer 3 replies, grade 1
    spent = ran.query("SELECT stage, SUM(prompt_tokens), SUM(completion_tokens), "
                      "ROUND(SUM(cost_usd), 6) FROM results GROUP BY stage ORDER BY stage")
    assert [(s["stage"], s["prompt_tokens"], s["completion_tokens"], s["cost_usd"])
            for s in (answer, grade)] == spent
    assert answer["prompt_tokens"] > 0 and grade["prompt_tokens"] > 0
    assert status["cost_of_results_usd"] == pytest.approx(answer["cost_usd"] + grade["cost_usd"])
    text = out_of(ran, capsys, "status")
    assert "tokens in" in text and "grade" in text and "skipped" in text


def test_status_and_export_count_items_not_yet_at_a_stage_as_pending_there(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = chained(make_pipeline, simulator, (ANSWER,))
    assert pipeline.run() == 1
    pipeline.config["stages"].append(dict(GRADE))  # grade added, not run yet: no rows there
    status = json.loads(out_of(pipeline, capsys, "status", "--json"))
    assert (status["items"], status["done"], status["failed"], status["pending"]) == (4, 0, 0, 4)
    assert [(s["stage"], s["done"], s["failed"], s["pending"]) for s in status["stages"]] == [
        ("answer", 3, 1, 0), ("grade", 0, 0, 4)]
    exported = records(pipeline, capsys)
    assert list(exported) == ["ok", "bad", "skip", "late"]
    assert {r["status"] for r in exported.values()} == {"pending"}
    assert list(records(pipeline, capsys, "--only", "pending")) == ["ok", "bad", "skip", "late"]
    item = json.loads(out_of(pipeline, capsys, "show", "ok"))
    assert item["status"] == "pending"
    assert item["stages"][0]["status"] == "done"
    assert item["stages"][1] == {"stage": "grade", "status": "pending"}


def test_failures_are_listed_at_the_stage_where_they_happened(ran: Pipeline,
                                                              capsys: Any) -> None:
    failures = json.loads(out_of(ran, capsys, "failures", "--json"))
    # `bad` is failed at grade too, stopped there by answer: listed once, where it happened
    assert [(f["id"], f["stage"], f["error_class"]) for f in failures] == [
        ("bad", "answer", "BadRequestError"), ("late", "grade", "BadRequestError")]
    only = json.loads(out_of(ran, capsys, "failures", "--stage", "grade", "--json"))
    assert [(f["id"], f["stage"]) for f in only] == [("late", "grade")]
    limited = json.loads(out_of(ran, capsys, "failures", "--limit", "1", "--json"))
    assert [f["id"] for f in limited] == ["bad"]
    table = out_of(ran, capsys, "failures")
    assert "stage" in table.splitlines()[1] and "answer" in table and "grade" in table
    assert ran.cli("failures", "--stage", "judge") == 2
    assert "answer, grade" in capsys.readouterr().err


def test_show_of_a_chained_item_shows_every_stage(ran: Pipeline, capsys: Any) -> None:
    item = json.loads(out_of(ran, capsys, "show", "ok"))
    assert (item["id"], item["row"], item["status"]) == ("ok", 1, "done")
    assert item["input"]["question"] == "What is 1 plus 1?"
    answer, grade = item["stages"]
    assert (answer["stage"], grade["stage"]) == ("answer", "grade")
    assert "What is 1 plus 1?" in answer["output"]
    assert answer["output"] in grade["request"]["messages"][1]["content"]
    assert set(grade["output"]) == {"grade", "why"}
    assert grade["attempts"][0]["status_code"] == 200 and grade["stopped_at"] is None
    stopped = json.loads(out_of(ran, capsys, "show", "bad"))
    assert stopped["status"] == "failed"
    assert stopped["stages"][0]["attempts"][0]["status_code"] == 400
    assert stopped["stages"][1]["stopped_at"] == "answer"
    assert ran.cli("show", "nope") == 2


def test_export_writes_the_last_stage_by_default_and_another_with_stage(
        ran: Pipeline, capsys: Any) -> None:
    graded = records(ran, capsys)
    assert list(graded) == ["ok", "bad", "skip", "late"]
    assert set(graded["ok"]["output"]) == {"grade", "why"}
    assert graded["ok"]["question"] == "What is 1 plus 1?"  # input from the first stage
    answered = records(ran, capsys, "--stage", "answer")
    assert "What is 1 plus 1?" in answered["ok"]["output"]
    assert [r["status"] for r in answered.values()] == ["done", "failed", "done", "done"]
    assert list(records(ran, capsys, "--stage", "answer", "--only", "failed")) == ["bad"]


def test_export_fields_take_any_stage_output_in_jsonl(ran: Pipeline, capsys: Any) -> None:
    exported = records(ran, capsys, "--fields", "question,answer.output,grade.output.grade")
    ok = exported["ok"]
    assert list(ok) == ["id", "question", "answer.output", "grade.output.grade", "status",
                        "output", "truncated", "error_class", "error"]
    assert "What is 1 plus 1?" in ok["answer.output"]
    assert ok["grade.output.grade"] == ok["output"]["grade"]
    assert exported["skip"]["grade.output.grade"] is None
    whole = records(ran, capsys, "--stage", "answer", "--fields", "grade.output")
    assert whole["ok"]["grade.output"] == ok["output"]


def test_export_fields_take_any_stage_output_in_csv(ran: Pipeline, capsys: Any) -> None:
    text = out_of(ran, capsys, "export", "--format", "csv", "--fields",
                  "question,answer.output,grade.output.grade")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["id", "question", "answer.output", "grade.output.grade", "status",
                       "output", "truncated", "error_class", "error"]
    ok = dict(zip(rows[0], rows[1]))
    # text values unquoted, as the output column's; an object as JSON
    assert ok["answer.output"].startswith("Simulated reply")
    assert ok["grade.output.grade"] and not ok["grade.output.grade"].startswith('"')
    assert json.loads(ok["output"])["grade"] == ok["grade.output.grade"]


def test_export_of_an_item_skipped_by_when_says_skipped(ran: Pipeline, capsys: Any) -> None:
    exported = records(ran, capsys)
    assert (exported["skip"]["status"], exported["skip"]["output"]) == ("skipped", None)
    assert list(records(ran, capsys, "--only", "skipped")) == ["skip"]


def test_export_of_an_item_failed_at_the_first_stage_is_failed_at_the_last(
        ran: Pipeline, capsys: Any) -> None:
    bad = records(ran, capsys)["bad"]
    assert (bad["status"], bad["error_class"]) == ("failed", "BadRequestError")
    assert bad["error"].startswith("stopped at stage 'answer': ")


def test_export_of_an_unknown_stage_exits_2_naming_the_stages(ran: Pipeline,
                                                              capsys: Any) -> None:
    capsys.readouterr()
    assert main(["export", str(ran.file), "--stage", "judge"]) == 2
    err = capsys.readouterr().err
    assert "'judge'" in err and "answer, grade" in err
