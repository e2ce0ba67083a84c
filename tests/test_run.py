"""End to end: the real openai SDK over loopback HTTP against flow's simulator."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
from typing import Any

import pytest
from conftest import API_KEY, Pipeline, flow_process, questions, wait_for_requests, write_rows

from flow.simulator import SimulatorConfig, SimulatorThread


def test_run_writes_every_result_and_rerun_makes_no_calls(make_pipeline: Any, simulator:
                                                          SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20
    results = pipeline.export(capsys)
    assert [r["id"] for r in results] == [f"q{i:05d}" for i in range(20)]
    assert all(r["status"] == "done" and r["error"] is None for r in results)
    assert results[3]["output"].endswith("You asked: What is 3 plus 3?")

    assert pipeline.run() == 0
    assert simulator.stats.requests == 20
    assert pipeline.query("SELECT items_skipped, calls_made FROM runs ORDER BY id DESC")[0] == (
        20, 0)


def test_changed_request_calls_again_only_for_that_item(make_pipeline: Any, simulator:
                                                        SimulatorThread) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    rows = questions(20)
    rows[5]["question"] = "What is the capital of Peru?"
    write_rows(pipeline.folder / "rows.jsonl", rows)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 21

    pipeline.config["call"]["model"] = "gpt-4.1-mini"
    assert pipeline.run() == 0
    assert simulator.stats.requests == 41
    pipeline.config["call"]["model"] = "gpt-4o-mini"
    assert pipeline.run() == 0
    assert simulator.stats.requests == 41


def test_injected_500s_and_429s_end_with_every_item_done(make_pipeline: Any, simulator:
                                                         SimulatorThread, capsys: Any) -> None:
    simulator.config.error_rate = 0.10
    simulator.config.rate_limit_rate = 0.05
    pipeline = make_pipeline(rows=questions(200), base_url=simulator.url,
                             call={"concurrency": 16, "retry": {"max_tries": 10,
                                                                "max_time_s": 120}})
    assert pipeline.run() == 0
    assert {r["status"] for r in pipeline.export(capsys)} == {"done"}
    assert simulator.stats.by_status[500] > 5
    assert simulator.stats.by_status[429] > 2
    attempts = pipeline.query("SELECT outcome, status_code FROM attempts WHERE outcome='error'")
    assert len(attempts) == simulator.stats.by_status[500] + simulator.stats.by_status[429]


def test_bad_request_fails_its_item_without_retry(make_pipeline: Any, simulator: SimulatorThread,
                                                  capsys: Any) -> None:
    rows = questions(10)
    rows[4]["question"] = "[sim:status=400] a question the server refuses"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 1
    results = {r["id"]: r for r in pipeline.export(capsys)}
    assert results["q00004"]["status"] == "failed"
    assert results["q00004"]["error_class"] == "BadRequestError"
    assert "400" in results["q00004"]["error"]
    assert sum(r["status"] == "done" for r in results.values()) == 9
    assert simulator.stats.requests == 10
    assert pipeline.query("SELECT attempts FROM results WHERE status='failed'") == [(1,)]


def test_wrong_key_stops_the_run_with_exit_2(make_pipeline: Any, simulator: SimulatorThread,
                                             capsys: Any) -> None:
    simulator.config.api_key = "sk-the-right-key"
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "401" in err and "API key" in err
    assert API_KEY not in err
    assert "Traceback" not in err
    assert simulator.stats.requests <= 8
    assert pipeline.query("SELECT COUNT(*) FROM responses") == [(0,)]
    assert pipeline.query("SELECT state FROM runs") == [("stopped",)]


def test_insufficient_quota_stops_the_run(make_pipeline: Any, simulator: SimulatorThread,
                                          capsys: Any) -> None:
    rows = questions(5)
    rows[0]["question"] = "[sim:status=429-quota]"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url, call={"concurrency": 1})
    assert pipeline.run() == 2
    assert "quota" in capsys.readouterr().err


def test_bad_rows_fail_alone_with_their_row_number(make_pipeline: Any, simulator: SimulatorThread,
                                                   capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    lines = [json.dumps(r).encode() for r in questions(6)]
    lines[1] = b'{"id": "q00001", "question": "unterminated'
    lines[2] = json.dumps({"id": "q00002", "text": "no question field"}).encode()
    lines[3] = b'{"id": "q00003", "question": "caf\xe9 latte?"}'
    lines[4] = b'["not", "an", "object"]'
    (pipeline.folder / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert pipeline.run() == 1
    results = pipeline.export(capsys)
    by_row = {row: error for row, error in pipeline.query(
        "SELECT row, error FROM results WHERE status='failed' ORDER BY row")}
    assert sorted(by_row) == [2, 3, 4, 5]
    assert "row 2: invalid JSON" in by_row[2]
    assert "missing template field 'question'" in by_row[3]
    assert "row 4: not valid utf-8" in by_row[4]
    assert "expected a JSON object" in by_row[5]
    assert [r["status"] for r in results].count("done") == 2
    assert simulator.stats.requests == 2


def test_duplicate_ids_fail_the_later_row(make_pipeline: Any, simulator: SimulatorThread,
                                          capsys: Any) -> None:
    rows = questions(5) + [{"id": "q00001", "question": "again?"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 1
    (failed,) = pipeline.query("SELECT item_id, error FROM results WHERE status='failed'")
    assert failed[0] == "q00001#row6"
    assert "duplicate id 'q00001'" in failed[1] and "row 6" in failed[1]
    results = {r["id"]: r for r in pipeline.export(capsys)}
    assert results["q00001"]["status"] == "done"
    assert results["q00001"]["output"].endswith("What is 1 plus 1?")


def test_rows_removed_from_the_input_leave_the_results(make_pipeline: Any, simulator:
                                                       SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    rows = questions(20)
    del rows[3:6]
    write_rows(pipeline.folder / "rows.jsonl", rows)
    assert pipeline.run() == 0
    assert "3 items whose rows left the input" in capsys.readouterr().err
    ids = [r["id"] for r in pipeline.export(capsys)]
    assert len(ids) == 17 and "q00004" not in ids
    assert simulator.stats.requests == 20
    assert pipeline.query("SELECT COUNT(*) FROM responses") == [(20,)]


def test_simulated_results_never_count_for_a_real_endpoint(make_pipeline: Any, simulator:
                                                           SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline()
    assert pipeline.run("--simulate") == 0
    assert "simulated" in capsys.readouterr().err
    pipeline.config["call"]["base_url"] = simulator.url
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20


def test_post_failure_keeps_the_paid_response_and_edited_post_reuses_it(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url, post=["strip", "json"])
    assert pipeline.run() == 1
    failed = pipeline.query(
        "SELECT error_class, response_id IS NOT NULL FROM results WHERE status='failed'")
    assert set(failed) == {("PostError", 1)}
    assert pipeline.run() == 1
    assert simulator.stats.requests == 20

    pipeline.config["post"] = [{"regex": r"Simulated reply (\w+):"}]
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20
    outputs = [r["output"] for r in pipeline.export(capsys)]
    assert all(isinstance(o, str) and len(o) == 8 for o in outputs)


def test_editing_a_python_post_steps_module_reapplies_it_without_calling(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url, post=[{"python": "tagging:tag"}])
    module = pipeline.folder / "tagging.py"
    module.write_text("def tag(text):\n    return 'v1:' + text[:10]\n")
    assert pipeline.run() == 0
    assert {r["output"][:3] for r in pipeline.export(capsys)} == {"v1:"}
    # a helper the function calls changes: the same step name, other code
    module.write_text("def helper(text):\n    return 'v2:' + text[:10]\n\n"
                      "def tag(text):\n    return helper(text)\n")
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20
    assert {r["output"][:3] for r in pipeline.export(capsys)} == {"v2:"}
    assert pipeline.run() == 0  # unchanged since: nothing to post again
    assert pipeline.query("SELECT COUNT(DISTINCT post_key) FROM outputs") == [(1,)]


def test_hangs_time_out_and_dropped_connections_are_retried(make_pipeline: Any, simulator:
                                                            SimulatorThread, capsys: Any) -> None:
    rows = questions(6)
    rows[1]["question"] = "[sim:hang]"
    rows[2]["question"] = "[sim:drop*2] dropped twice, then answered"
    rows[3]["question"] = "[sim:status=503*1] unavailable once"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"timeout_s": 0.5, "retry": {"max_tries": 3, "max_time_s": 30}})
    assert pipeline.run() == 1
    results = {r["id"]: r for r in pipeline.export(capsys)}
    assert results["q00001"]["error_class"] == "APITimeoutError"
    assert "gave up after 3 attempts" in results["q00001"]["error"]
    assert sum(r["status"] == "done" for r in results.values()) == 5
    outcomes = pipeline.query("SELECT outcome FROM attempts WHERE request_key = "
                              "(SELECT request_key FROM items WHERE item_id='q00002') "
                              "ORDER BY rowid")
    assert outcomes == [("connection error",), ("connection error",), ("ok",)]


def test_limit_calls_only_the_first_pending_items(make_pipeline: Any, simulator: SimulatorThread,
                                                  capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run("--limit", "5") == 0
    assert simulator.stats.requests == 5
    assert pipeline.run("--limit", "5") == 0
    assert simulator.stats.requests == 10
    statuses = [r["status"] for r in pipeline.export(capsys)]
    assert statuses == ["done"] * 10 + ["pending"] * 10


def test_retry_failed_calls_only_failed_items(make_pipeline: Any, simulator: SimulatorThread,
                                              capsys: Any) -> None:
    rows = questions(20)
    rows[2]["question"] = "[sim:status=400] refused"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url, post=["json"])
    assert pipeline.run("--limit", "4") == 1  # 3 post-step failures and one 400
    # a post-step failure is posted again from its stored reply: nothing is paid again
    assert pipeline.run("--retry-failed", "--error-class", "PostError") == 1
    assert simulator.stats.requests == 4
    assert pipeline.run("--retry-failed", "--error-class", "PostError", "--recall") == 1
    assert simulator.stats.requests == 7
    assert pipeline.run("--retry-failed", "--error-class", "BadRequestError") == 1
    assert simulator.stats.requests == 8
    assert pipeline.query("SELECT COUNT(*) FROM results WHERE status='pending'") == [(16,)]
    capsys.readouterr()
    assert pipeline.run("--retry-failed", "--error-class", "PostEror") == 2
    assert ("--error-class PostEror: no failed item has this class; the failed items have: "
            "BadRequestError (1), PostError (3)") in capsys.readouterr().err
    assert simulator.stats.requests == 8


@pytest.mark.slow
def test_kill_9_then_rerun_exports_every_item_exactly_once(make_pipeline: Any) -> None:
    """800 items, concurrency 32, 20 ms latency: SIGKILL mid-run, resume, then nothing left."""
    with SimulatorThread() as server:
        server.config.latency_ms = 20
        pipeline = make_pipeline(rows=questions(800), base_url=server.url,
                                 call={"concurrency": 32})
        child = flow_process(pipeline)
        wait_for_requests(server, random.Random(2026).randint(150, 600), within_s=60)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        first = server.stats.requests
        assert 0 < first < 800

        resumed = flow_process(pipeline)
        assert resumed.wait(120) == 0, resumed.stderr.read() if resumed.stderr else ""
        assert server.stats.requests <= 800 + 32
        assert server.stats.max_per_request <= 2

        export = flow_process_export(pipeline)
        ids = [row["id"] for row in export]
        assert len(ids) == 800 and len(set(ids)) == 800
        assert all(row["status"] == "done" for row in export)
        with sqlite3.connect(pipeline.store) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

        before = server.stats.requests
        third = flow_process(pipeline)
        assert third.wait(60) == 0
        assert server.stats.requests == before


def flow_process_export(pipeline: Pipeline) -> list[dict[str, Any]]:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "flow", "export", str(pipeline.file)],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
def test_sigint_drains_in_flight_requests_and_exits_130(make_pipeline: Any) -> None:
    with SimulatorThread() as server:
        server.config.latency_ms = 200
        pipeline = make_pipeline(rows=questions(400), base_url=server.url,
                                 call={"concurrency": 16})
        child = flow_process(pipeline)
        wait_for_requests(server, 40)
        child.send_signal(signal.SIGINT)
        assert child.wait(30) == 130
        err = child.stderr.read() if child.stderr else ""
        assert "run the same command again to resume" in err
        assert "note: stopped on request (Ctrl-C or SIGTERM)" in err and "draining" not in err
        assert "Traceback" not in err
        sent = server.stats.requests
        done = pipeline.query("SELECT COUNT(*) FROM results WHERE status='done'")[0][0]
        assert done == sent
        assert pipeline.query("SELECT state FROM runs") == [("interrupted",)]


def test_run_under_a_server_limit_learns_it_and_meets_few_429s(make_pipeline: Any,
                                                               capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(rpm=3000, latency_ms=20)) as server:
        pipeline = make_pipeline(rows=questions(150), base_url=server.url,
                                 call={"concurrency": 50})
        assert pipeline.run() == 0
        assert {r["status"] for r in pipeline.export(capsys)} == {"done"}
        assert server.stats.by_status[429] <= 3  # the pace it kept: bench/rate_limits.py


def test_latency_is_the_servers_not_the_wait_for_the_rate_limiter(make_pipeline: Any,
                                                                   capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=20)) as server:
        # 30 a second: the last of 30 waits about a second for its turn, then takes 20 ms
        pipeline = make_pipeline(rows=questions(30), base_url=server.url,
                                 call={"concurrency": 30, "rpm": 1800})
        assert pipeline.run() == 0
    # the first few pay for the client's start (connections, lazy imports); the last waited
    # about a second for its turn, and that wait is not the server's
    latencies = [ms for (ms,) in pipeline.query(
        "SELECT latency_ms FROM responses ORDER BY started_at")]
    assert 20 <= latencies[-1] < 400 and sorted(latencies)[15] < 400
    [(first, last)] = pipeline.query("SELECT MIN(started_at), MAX(started_at) FROM responses")
    assert first < last  # when each was sent, not when it was picked up


@pytest.mark.parametrize("rpm", [None, 3000], ids=["learned", "rpm-in-yaml"])
def test_a_short_job_under_a_sliding_one_second_window_meets_few_429s(
        make_pipeline: Any, capsys: Any, rpm: int | None) -> None:
    # at most 50 in any one second: a pace that bunches (a full second's burst after a
    # pause, turns made up for after a late wake) goes over it
    config = SimulatorConfig(rpm=3000, window="sliding-1s", latency_ms=20)
    with SimulatorThread(config) as server:
        call: dict[str, Any] = {"concurrency": 50} | ({"rpm": rpm} if rpm else {})
        pipeline = make_pipeline(rows=questions(150), base_url=server.url, call=call)
        assert pipeline.run() == 0
        assert {r["status"] for r in pipeline.export(capsys)} == {"done"}
        assert server.stats.by_status[429] <= 3


@pytest.mark.slow
def test_a_second_run_on_a_live_store_is_refused_naming_the_process(make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=300)) as server:
        pipeline = make_pipeline(rows=questions(200), base_url=server.url,
                                 call={"concurrency": 4})
        first = flow_process(pipeline)
        wait_for_requests(server, 4)
        second = flow_process(pipeline)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert f"another flow run (pid {first.pid})" in err and "Traceback" not in err
        first.send_signal(signal.SIGINT)
        first.send_signal(signal.SIGINT)
        assert first.wait(30) == 130


def test_a_field_no_template_reads_is_updated_without_a_call(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = [{**row, "label": "cat"} for row in questions(3)]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 0
    rows[1]["label"] = "dog"
    write_rows(pipeline.folder / "rows.jsonl", rows)
    assert pipeline.run() == 0
    capsys.readouterr()
    assert pipeline.cli("export", "--fields", "label") == 0
    labels = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert labels == ["cat", "dog", "cat"]
    assert simulator.stats.requests == 3


def test_a_renamed_duplicate_never_takes_the_id_of_a_real_item(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = [{"id": "x", "question": "first"}, {"id": "x#row3", "question": "a real item"},
            {"id": "x", "question": "a duplicate at row 3"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 1
    results = {r["id"]: r for r in pipeline.export(capsys)}
    assert results["x#row3"]["status"] == "done"
    assert results["x#row3#2"]["status"] == "failed"
    assert "duplicate id 'x'" in results["x#row3#2"]["error"]
    assert pipeline.run() == 1
    assert simulator.stats.requests == 2


def test_a_tool_call_reply_is_an_output_bought_once(make_pipeline: Any, simulator:
                                                    SimulatorThread, capsys: Any) -> None:
    tools = [{"type": "function", "function": {
        "name": "find_capital", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}}}}}]
    pipeline = make_pipeline(rows=questions(3), base_url=simulator.url,
                             call={"params": {"tools": tools}}, post=["json"])
    assert pipeline.run() == 0
    results = pipeline.export(capsys)
    call = results[1]["output"][0]
    assert call["function"]["name"] == "find_capital"
    assert json.loads(call["function"]["arguments"]) == {"query": "What is 1 plus 1?"}
    assert pipeline.query("SELECT COUNT(*), MIN(cost_usd) > 0 FROM responses") == [(3, 1)]
    assert pipeline.run() == 0
    assert simulator.stats.requests == 3


def test_numbers_json_cannot_hold_fail_their_row_or_item_and_exports_stay_valid(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    (make_pipeline().folder / "huge.py").write_text(
        "def huge(value):\n    return {'n': float('inf')} if '2 plus' in value else value\n")
    pipeline = make_pipeline(base_url=simulator.url, post=[{"python": "huge:huge"}])
    rows = pipeline.folder / "rows.jsonl"
    rows.write_text('{"id": "a", "question": "What is 1 plus 1?", "w": 1.5}\n'
                    '{"id": "b", "question": "What is 2 plus 2?"}\n'
                    '{"id": "c", "question": "big", "w": 1e400}\n'
                    '{"id": "d", "question": "nan", "w": NaN}\n')
    assert pipeline.run() == 1
    capsys.readouterr()
    assert pipeline.cli("export", "--fields", "w") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["status"] for r in records] == ["done", "failed", "failed", "failed"]
    assert "not JSON" in records[1]["error"] and "out of range" in records[2]["error"]
    assert pipeline.cli("export", "--format", "csv", "--fields", "w") == 0


def test_a_stray_csv_quote_fails_one_row_and_the_summary_counts_rows_against_lines(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    lines = ["id,question"] + [f"r{i},What is {i} plus {i}?" for i in range(100)]
    lines[3] = 'r2,"What is 2 plus 2?'  # a stray quote, never closed
    lines[50] = 'r49,"What is\n49 plus 49?"'  # a field that spans two lines, rightly
    pipeline = make_pipeline(base_url=simulator.url, load={"path": "rows.csv"})
    (pipeline.folder / "rows.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert pipeline.run() == 1
    out = capsys.readouterr().err
    assert "99 done" in out and "1 failed" in out
    assert "100 rows were read from 101 lines of input" in out
    [(item, error)] = pipeline.query("SELECT item_id, error FROM results WHERE status='failed'")
    assert item == "#row4" and "stray quote" in error
    assert simulator.stats.requests == 99


def test_a_bad_row_never_takes_the_id_of_a_real_row_wherever_it_comes(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    lines = [json.dumps({"id": n, "question": f"What is {n}?"}) for n in (1, 3, 4)]
    lines.insert(1, '{"id": 9, "question": "unterminated')  # line 2: its id cannot be read
    lines.append(json.dumps({"id": 2, "question": "What is 2?"}))  # a real id 2, later
    lines.append(json.dumps({"id": "#row2", "question": "Who names ids like this?"}))
    (pipeline.folder / "rows.jsonl").write_text("\n".join(lines) + "\n")
    assert pipeline.run() == 1
    results = {r["id"]: r for r in pipeline.export(capsys)}
    assert {i: r["status"] for i, r in results.items()} == {
        "1": "done", "#row2#2": "failed", "3": "done", "4": "done", "2": "done",
        "#row2": "done"}
    assert "row 2: invalid JSON" in results["#row2#2"]["error"]
    assert pipeline.run() == 1  # the same names again: nothing changes, nothing is paid
    assert {r["id"] for r in pipeline.export(capsys)} == set(results)
    assert simulator.stats.requests == 5


def test_typed_csv_values_reach_templates_as_numbers(make_pipeline: Any, simulator:
                                                     SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(
        base_url=simulator.url, load={"path": "reviews.csv", "types": {"stars": "int"}},
        call={"messages": [{"role": "user", "content":
                            "{% if stars == 1 %}angry{% else %}calm{% endif %}: {{ question }}"}]})
    (pipeline.folder / "reviews.csv").write_text("id,stars,question\na,1,Bad.\nb,5,Good.\n")
    assert pipeline.run() == 0
    outputs = {r["id"]: r["output"] for r in pipeline.export(capsys)}
    assert "You asked: angry: Bad." in outputs["a"] and "You asked: calm: Good." in outputs["b"]
