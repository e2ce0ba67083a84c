"""Chains of call stages, end to end through the openai SDK against the simulator: each
stage content-keyed on its own request, items streaming from stage to stage, skips, stops
and kills."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Pipeline, flow_process, wait_for_requests, write_rows

from flow.cli import main
from flow.config import load_config
from flow.run import Run, RunOptions
from flow.simulator import SimulatorConfig, SimulatorThread

FIRST, SECOND = "gpt-4o-mini", "gpt-4o"  # one model per stage: the server counts each


def rows(count: int, hard_every: int = 10) -> list[dict[str, Any]]:
    return [{"id": f"q{i:05d}", "question": f"What is {i} plus {i}?",
             "hard": i % hard_every == 0} for i in range(count)]


def chain(folder: Path, base_url: str, items: list[dict[str, Any]],
          **grade: Any) -> Pipeline:
    """answer (keeps the question the simulator echoes) -> grade, on two models."""
    write_rows(folder / "rows.jsonl", items)
    config = {
        "store": "flow.db",
        "load": {"path": "rows.jsonl", "id": "id"},
        "defaults": {"base_url": base_url, "concurrency": 16, "timeout_s": 5,
                     "retry": {"max_tries": 4, "max_time_s": 30, "first_wait_s": 0,
                               "max_wait_s": 0}},
        "stages": [
            {"name": "answer", "model": FIRST,
             "messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user",
                           "content": "{{ question }}{% if hard %} Think.{% endif %}"}],
             # the question the simulator echoes, without a fault marker
             "post": [{"regex": r"You asked: (?:\[sim:[^\]]*\] )?(.*)"}]},
            {"name": "grade", "model": SECOND,
             "messages": [{"role": "user", "content": "Grade: {{ answer.output }}"}],
             "post": ["strip"], **grade},
        ],
    }
    return Pipeline(folder, config)


def calls(server: SimulatorThread) -> tuple[int, int]:
    """Requests the server received for each stage so far."""
    return server.stats.by_model[FIRST], server.stats.by_model[SECOND]


def results(pipeline: Pipeline, stage: str) -> dict[str, tuple[str, Any, Any]]:
    return {item_id: (status, output, error) for item_id, status, output, error in
            pipeline.query("SELECT item_id, status, output_text, error FROM results "
                           "WHERE stage = ?", (stage,))}


def test_edit_a_stage_and_pay_only_for_what_changed(env: None, simulator: SimulatorThread,
                                                    tmp_path: Path) -> None:
    pipeline = chain(tmp_path, simulator.url, rows(200))
    assert pipeline.run() == 0
    assert calls(simulator) == (200, 200)
    graded = results(pipeline, "grade")
    assert len(graded) == 200 and {s for s, _, _ in graded.values()} == {"done"}
    assert pipeline.run() == 0
    assert calls(simulator) == (200, 200)

    # stage 2's prompt edited: every item's grade is asked again, nothing else; back: nothing
    second = pipeline.config["stages"][1]["messages"][0]
    second["content"] = "Grade this answer: {{ answer.output }}"
    assert pipeline.run() == 0
    assert calls(simulator) == (200, 400)
    second["content"] = "Grade: {{ answer.output }}"
    assert pipeline.run() == 0
    assert calls(simulator) == (200, 400)

    # stage 1 edited for everyone, its output changed for the 20 hard items only: their
    # grades alone are asked again
    first = pipeline.config["stages"][0]["messages"]
    first[0]["content"] = "Answer very briefly."
    first[1]["content"] = "{{ question }}{% if hard %} Think hard.{% endif %}"
    assert pipeline.run() == 0
    assert calls(simulator) == (400, 420)
    assert results(pipeline, "answer")["q00010"][1] == "What is 10 plus 10? Think hard."
    assert pipeline.run() == 0
    assert calls(simulator) == (400, 420)


def test_a_stage_taken_out_of_the_pipeline_leaves_the_store(env: None,
                                                            simulator: SimulatorThread,
                                                            tmp_path: Path) -> None:
    pipeline = chain(tmp_path, simulator.url, rows(30))
    assert pipeline.run() == 0
    stages = "SELECT stage, COUNT(*) FROM items GROUP BY stage ORDER BY stage"
    assert pipeline.query(stages) == [("answer", 30), ("grade", 30)]
    pipeline.config["stages"] = pipeline.config["stages"][:1]
    assert pipeline.run() == 0
    assert pipeline.query(stages) == [("answer", 30)]
    assert pipeline.query("SELECT COUNT(*) FROM outputs WHERE stage = 'grade'") == [(0,)]
    assert pipeline.query("SELECT COUNT(*) FROM responses") == [(60,)]  # paid replies stay
    assert calls(simulator) == (30, 30)


def test_when_false_skips_the_stage_and_export_says_so(env: None, simulator: SimulatorThread,
                                                       tmp_path: Path, capsys: Any) -> None:
    pipeline = chain(tmp_path, simulator.url, rows(300),
                     when="{{ 'Think' not in answer.output }}")  # false for every 10th
    assert pipeline.run() == 0
    assert calls(simulator) == (300, 270)
    graded = results(pipeline, "grade")
    skipped = sorted(item for item, (status, _, _) in graded.items() if status == "skipped")
    assert len(skipped) == 30 and skipped[:2] == ["q00000", "q00010"]
    exported = {record["id"]: record for record in pipeline.export(capsys)}
    assert exported["q00010"]["status"] == "skipped" and exported["q00010"]["output"] is None
    assert exported["q00011"]["status"] == "done"
    assert pipeline.run() == 0  # skips are not failures, and cost nothing on a re-run
    assert calls(simulator) == (300, 270)


def test_an_item_failing_at_a_stage_stops_there_with_its_reason(
        env: None, simulator: SimulatorThread, tmp_path: Path, capsys: Any) -> None:
    items = rows(20)
    items[3]["question"] = "[sim:status=400] What is 3 plus 3?"
    pipeline = chain(tmp_path, simulator.url, items)
    assert pipeline.run() == 1
    assert calls(simulator) == (20, 19)
    status, _, error = results(pipeline, "grade")["q00003"]
    assert status == "failed" and error.startswith("stopped at stage 'answer': ")
    assert pipeline.query("SELECT stopped_at, error_class FROM results WHERE stage = 'grade' "
                          "AND item_id = 'q00003'") == [("answer", "BadRequestError")]
    exported = {record["id"]: record for record in pipeline.export(capsys)}
    assert exported["q00003"]["status"] == "failed"
    assert "stopped at stage 'answer'" in exported["q00003"]["error"]

    # the row fixed: stage 1 calls it, and it goes on to stage 2 in the same run
    items[3]["question"] = "What is 3 plus 3?"
    write_rows(tmp_path / "rows.jsonl", items)
    assert pipeline.run() == 0
    assert calls(simulator) == (21, 20)
    assert results(pipeline, "grade")["q00003"][0] == "done"


def test_retry_failed_at_one_stage_leaves_the_others(env: None, simulator: SimulatorThread,
                                                    tmp_path: Path) -> None:
    items = rows(10)
    items[2]["question"] = "[sim:status=500*4] What is 2 plus 2?"  # 500s until max_tries
    pipeline = chain(tmp_path, simulator.url, items)
    assert pipeline.run() == 1
    assert results(pipeline, "answer")["q00002"][0] == "failed"
    before = calls(simulator)
    assert pipeline.run("--retry-failed", "--stage", "grade") == 1
    assert calls(simulator) == before  # grade had no failure of its own: nothing is sent
    assert pipeline.run("--retry-failed", "--stage", "answer") == 0
    assert calls(simulator)[1] == before[1] + 1  # the fixed answer went on to its grade
    assert results(pipeline, "grade")["q00002"][0] == "done"
    assert pipeline.run("--retry-failed", "--stage", "judge") == 2


def test_a_python_step_edited_in_a_later_stage_reapplies_without_calling(
        env: None, simulator: SimulatorThread, tmp_path: Path) -> None:
    module = tmp_path / "steps.py"
    module.write_text("def tag(text):\n    return 'v1:' + text[:12]\n")
    pipeline = chain(tmp_path, simulator.url, rows(30), post=[{"python": "steps:tag"}])
    assert pipeline.run() == 0
    module.write_text("def tag(text):\n    return 'v2:' + text[:12]\n")
    assert pipeline.run() == 0
    assert calls(simulator) == (30, 30)
    assert {output[:3] for _, output, _ in results(pipeline, "grade").values()} == {"v2:"}


def test_kill_9_anywhere_resumes_every_stage_without_paying_twice(env: None,
                                                                  tmp_path: Path) -> None:
    """600 items through 2 stages, 10 ms latency: SIGKILLs at random moments, then resume."""
    concurrency, kills = 32, 2
    chooser = random.Random(13)
    with SimulatorThread(SimulatorConfig(latency_ms=10)) as server:
        pipeline = chain(tmp_path, server.url, rows(600))
        pipeline.config["defaults"]["concurrency"] = concurrency
        for _ in range(kills):
            child = flow_process(pipeline)
            wait_for_requests(server, server.stats.requests + chooser.randint(100, 450), 60)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        resumed = flow_process(pipeline)
        assert resumed.wait(180) == 0, resumed.stderr.read() if resumed.stderr else ""
        first, second = calls(server)
        bound = 600 + kills * concurrency
        assert first <= bound and second <= bound, (first, second)
        assert server.stats.max_per_request <= kills + 1
        out = subprocess.run([sys.executable, "-m", "flow", "export", str(pipeline.file),
                              "--stage", "answer"], capture_output=True, text=True, check=True)
        assert out.stdout.count('"status":"done"') == 600
        for stage in ("answer", "grade"):
            assert pipeline.query("SELECT COUNT(*), COUNT(DISTINCT item_id) FROM results "
                                  "WHERE stage = ? AND status = 'done'", (stage,)) == [
                (600, 600)]
        # every paid reply once per request: a kill never stored one twice
        assert pipeline.query("SELECT COUNT(*) - COUNT(DISTINCT request_key) FROM responses"
                              ) == [(0,)]
        before = server.stats.requests
        assert main(["run", str(pipeline.file)]) == 0
        assert server.stats.requests == before


def test_the_dry_run_predicts_each_stage(env: None, simulator: SimulatorThread,
                                         tmp_path: Path, capsys: Any) -> None:
    pipeline = chain(tmp_path, simulator.url, rows(40))
    assert pipeline.run("--limit", "10") == 0  # 10 calls: answers first, so some grades wait
    capsys.readouterr()
    assert pipeline.run("--dry-run") == 0
    out = " ".join(capsys.readouterr().out.split())
    done_first, done_second = (len([r for r in results(pipeline, s).values() if r[0] == "done"])
                               for s in ("answer", "grade"))
    assert f"stage answer: {done_first} already done, {40 - done_first} to call" in out
    assert (f"stage grade: {done_second} already done, {40 - done_second} to call" in out), out
    assert "estimate for every stage" in out
    before = calls(simulator)
    assert pipeline.run() == 0
    assert sum(calls(simulator)) - sum(before) == 80 - done_first - done_second


def test_stages_on_one_model_share_one_limiter(env: None, tmp_path: Path) -> None:
    """Providers limit per model: two stages on one model pace as one, at the lower limit
    either sets; a stage on another model has a limiter of its own."""
    pipeline = chain(tmp_path, "http://127.0.0.1:9/v1", rows(3))
    stages = pipeline.config["stages"]
    stages.append({**stages[1], "name": "recheck", "model": FIRST, "rpm": 600})
    stages[0]["rpm"] = 900
    run = Run(load_config(pipeline.write()), RunOptions())
    limiters = run._limiters()
    assert set(limiters) == {FIRST, SECOND}
    assert limiters[FIRST].limit("requests") == 600
    assert limiters[SECOND].limit("requests") is None


def test_browse_shows_the_last_stage_with_each_earlier_output_beside_it(
        env: None, simulator: SimulatorThread, tmp_path: Path) -> None:
    pipeline = chain(tmp_path, simulator.url, rows(12))
    assert pipeline.run() == 0
    browse = pipeline.query("SELECT item_id, question, answer_output, output, status "
                            "FROM browse ORDER BY row")
    assert len(browse) == 12 and {row[4] for row in browse} == {"done"}
    item_id, question, answer, grade, _ = browse[10]
    assert (item_id, question, answer) == ("q00010", "What is 10 plus 10?",
                                           "What is 10 plus 10? Think.")
    assert grade == results(pipeline, "grade")["q00010"][1]
