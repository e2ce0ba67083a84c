"""The command line: exit codes and clear messages, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, questions, write_rows

from flow.cli import main
from flow.endpoints import chat, responses
from flow.simulator import SimulatorThread


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_pipeline_file_exits_2(tmp_path: Path, capsys: Any) -> None:
    code, _, err = run_main([str(tmp_path / "none.yaml")], capsys)
    assert code == 2
    assert "none.yaml: no such pipeline file" in err
    assert "Traceback" not in err


def test_bad_config_exits_2_with_key_path(make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline()
    pipeline.config["call"]["concurrency"] = "many"
    code = pipeline.run()
    err = capsys.readouterr().err
    assert code == 2
    assert "call.concurrency" in err and "pipeline.yaml" in err


def test_missing_input_file_exits_2(make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline()
    pipeline.config["load"]["path"] = "missing.jsonl"
    assert pipeline.run("--simulate") == 2
    assert "missing.jsonl: input file not found (load.path)" in capsys.readouterr().err


def test_error_messages_keep_their_square_brackets(make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline()
    pipeline.config["load"]["path"] = "[draft] rows.jsonl"
    assert pipeline.run("--simulate") == 2
    assert "[draft] rows.jsonl: input file not found" in capsys.readouterr().err


def test_no_api_key_says_how_to_set_one(make_pipeline: Any, capsys: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = make_pipeline()
    monkeypatch.delenv("OPENAI_API_KEY")
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY" in err and "--simulate" in err


def test_bad_template_exits_2(make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline()
    pipeline.config["call"]["messages"][1]["content"] = "{{ question "
    assert pipeline.run("--simulate") == 2
    assert "call.messages[1].content: invalid template" in capsys.readouterr().err


def test_bad_option_exits_2(capsys: Any) -> None:
    assert main(["run", "p.yaml", "--limit", "zero"]) == 2
    assert main(["status"]) == 2


def test_status_json_counts(make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = [{"id": "a", "question": "fine"}, {"id": "b", "question": "[sim:status=400]"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 1
    capsys.readouterr()
    assert pipeline.cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["items"], status["done"], status["failed"], status["pending"]) == (2, 1, 1, 0)
    assert status["failed_by_error_class"] == {"BadRequestError": 1}
    assert status["runs"][0]["state"] == "finished"


def test_status_before_any_run_says_so(make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline()
    assert pipeline.cli("status") == 2
    assert "no store yet" in capsys.readouterr().err


def test_export_to_file_is_complete_and_in_input_order(make_pipeline: Any, simulator:
                                                       SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    out = pipeline.folder / "out" / "results.jsonl"
    assert pipeline.cli("export", "-o", str(out), "--fields", "question") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i:05d}" for i in range(20)]
    assert rows[0]["question"] == "What is 0 plus 0?"
    assert set(rows[0]) == {"id", "question", "status", "output", "truncated", "error_class",
                            "error"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_show_prints_request_response_and_attempts(make_pipeline: Any, simulator:
                                                   SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    capsys.readouterr()
    assert pipeline.cli("show", "q00002") == 0
    item = json.loads(capsys.readouterr().out)
    assert item["request"]["messages"][1]["content"] == "What is 2 plus 2?"
    assert item["response"]["choices"][0]["finish_reason"] == "stop"
    assert item["attempts"][0]["status_code"] == 200
    assert pipeline.cli("show", "nope") == 2


def test_console_script_and_module_agree() -> None:
    done = subprocess.run([sys.executable, "-m", "flow", "--version"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.startswith("flow ")


def test_read_commands_start_without_the_openai_sdk() -> None:
    # status, export, show... start in a fraction of the time `run` needs to load the SDK
    code = "import sys, flow.cli; print(sorted(m for m in sys.modules if m.startswith('openai')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_run_with_nothing_to_send_never_loads_the_sdk(make_pipeline: Any,
                                                        simulator: SimulatorThread) -> None:
    # a re-run over finished work imports neither the SDK nor its transport (half a second)
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    code = ("import sys; from flow.cli import main; code = main(['run', sys.argv[1]]); "
            "print(code, sorted(m for m in sys.modules if m.startswith(('openai', 'aiohttp'))))")

    def run_apart() -> str:
        done = subprocess.run([sys.executable, "-c", code, str(pipeline.file)],
                              capture_output=True, text=True,
                              env={**os.environ, "OPENAI_API_KEY": API_KEY})
        return done.stdout.strip().splitlines()[-1]

    assert run_apart() == "0 []"
    assert simulator.stats.requests == 20
    write_rows(pipeline.folder / "rows.jsonl", questions(21))
    assert run_apart().startswith("0 ['aiohttp")  # one row more: the SDK sends it
    assert simulator.stats.requests == 21
    assert pipeline.query("SELECT DISTINCT endpoint FROM runs") == [(simulator.url + "/",)]


def test_common_params_are_the_sdks_own() -> None:
    # taken without the SDK: each must be a parameter the SDK's create takes
    assert chat._chat_params() >= chat.COMMON_PARAMS
    assert responses._responses_params() >= responses.COMMON_PARAMS


def test_dry_run_counts_estimates_and_calls_nothing(make_pipeline: Any, simulator:
                                                    SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run("--limit", "5") == 0
    runs_before = pipeline.query("SELECT COUNT(*) FROM runs")
    capsys.readouterr()
    assert pipeline.run("--dry-run") == 0
    out = capsys.readouterr().out
    assert "20 rows; 5 already done, 15 to call" in out
    assert '"content": "What is 5 plus 5?"' in out
    assert "prompt tokens" in out and "$" in out and "nothing was called" in out
    assert simulator.stats.requests == 5
    assert pipeline.query("SELECT COUNT(*) FROM runs") == runs_before


def test_dry_run_counts_what_the_run_then_does(make_pipeline: Any, simulator: SimulatorThread,
                                              capsys: Any) -> None:
    rows = [{"id": f"r{i}", "question": f"What is {i % 4}?"} for i in range(10)]
    rows.append({"id": "r1", "question": "a duplicate id"})
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    capsys.readouterr()
    assert pipeline.run("--dry-run") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "11 rows; 0 already done, 4 to call (6 more items share those requests)" in out
    assert "1 bad rows" in out and "duplicate id 'r1'" in out
    assert pipeline.run() == 1
    assert simulator.stats.requests == 4


def test_dry_run_needs_no_key_and_no_store(make_pipeline: Any, capsys: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    pipeline = make_pipeline()
    assert pipeline.run("--dry-run") == 0
    assert "20 to call" in capsys.readouterr().out
    assert not pipeline.store.exists()


def test_max_cost_stops_starting_requests_and_says_so(make_pipeline: Any, simulator:
                                                      SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url, call={
        "concurrency": 1, "max_cost_usd": 1.0,
        "price": {"input_per_1m": 1_000_000, "output_per_1m": 1_000_000}})
    assert pipeline.run() == 1
    err = capsys.readouterr().err
    assert "max_cost_usd" in err
    assert 1 <= simulator.stats.requests <= 3
    assert pipeline.run() == 1
    assert simulator.stats.requests <= 3


def test_failures_lists_filters_and_prints_json(make_pipeline: Any, simulator: SimulatorThread,
                                                capsys: Any) -> None:
    rows = [{"id": "ok", "question": "fine"},
            {"id": "bad", "question": "[sim:status=400]"},
            {"id": "gone", "question": "[sim:status=404]"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 1
    capsys.readouterr()
    assert pipeline.cli("failures") == 0
    out = capsys.readouterr().out
    assert "bad" in out and "gone" in out and "BadRequestError" in out and "NotFoundError" in out
    assert pipeline.cli("failures", "--error-class", "NotFoundError", "--json") == 0
    failures = json.loads(capsys.readouterr().out)
    assert [(f["id"], f["error_class"], f["attempts"]) for f in failures] == [
        ("gone", "NotFoundError", 1)]


def test_export_csv_and_only_failed(make_pipeline: Any, simulator: SimulatorThread,
                                    capsys: Any) -> None:
    import csv
    import io
    rows = [{"id": "ok", "question": "fine"}, {"id": "bad", "question": "[sim:status=400]"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 1
    capsys.readouterr()
    assert pipeline.cli("export", "--format", "csv", "--fields", "question") == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["id"], r["question"], r["status"]) for r in table] == [
        ("ok", "fine", "done"), ("bad", "[sim:status=400]", "failed")]
    assert table[0]["output"].startswith("Simulated reply")
    assert pipeline.cli("export", "--only", "failed") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["bad"]


def test_progress_is_plain_lines_when_not_a_terminal(make_pipeline: Any) -> None:
    from conftest import flow_process
    pipeline = make_pipeline()
    child = flow_process(pipeline, "--simulate", "--sim-latency-ms", "20")
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0
    assert "items/s" in err and "ETA" in err and "\x1b[" not in err
    assert "finished: 20 done" in err


def test_max_cost_is_not_overshot_by_a_round_of_concurrent_calls(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(rows=questions(100), base_url=simulator.url, call={
        "concurrency": 16, "max_cost_usd": 0.2,
        "price": {"input_per_1m": 1000, "output_per_1m": 1000}})
    assert pipeline.run() == 1
    ((spent, calls),) = pipeline.query("SELECT SUM(cost_usd), COUNT(*) FROM responses")
    per_call = spent / calls
    assert 0.2 - per_call <= spent < 0.2 + 2 * per_call, (spent, calls)
    assert "max_cost_usd" in capsys.readouterr().err


def test_dry_run_with_a_limit_counts_what_that_run_does(make_pipeline: Any, simulator:
                                                         SimulatorThread, capsys: Any) -> None:
    rows = questions(2500)
    pipeline = make_pipeline(rows=rows[:2000], base_url=simulator.url,
                             call={"concurrency": 32})
    assert pipeline.run() == 0
    pipeline.config["post"] = ["strip", "lower"]
    write_rows(pipeline.folder / "rows.jsonl", rows[2000:2100] + rows[:2000] + rows[2100:])
    capsys.readouterr()
    assert pipeline.run("--dry-run", "--limit", "5") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "5 to call" in out and "900 to post-process again" in out, out
    assert pipeline.run("--limit", "5") == 0
    assert simulator.stats.requests == 2005
    ((lowered,),) = pipeline.query("SELECT COUNT(*) FROM outputs WHERE output = lower(output) "
                                   "AND status = 'done' AND request_key IS NOT NULL "
                                   "AND output LIKE '%simulated reply%'")
    assert lowered == 5 + 900


def test_a_param_the_endpoint_does_not_take_exits_2_before_anything_is_sent(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url, call={"params": {"temprature": 0.5}})
    for args in ((), ("--dry-run",)):
        assert pipeline.run(*args) == 2
        err = capsys.readouterr().err
        assert "pipeline.yaml: call.params.temprature: not a chat completions parameter; " \
            "did you mean 'temperature'?" in err
    pipeline.config["call"]["params"] = {"extra_headers": {"X-Token": "t"}}
    assert pipeline.run() == 2
    assert "put headers in call.headers" in capsys.readouterr().err
    assert simulator.stats.requests == 0


@pytest.mark.parametrize("key", ["sk-test-0123456789abcdef\r", "sk-tést-0123456789"])
def test_an_api_key_that_cannot_be_sent_exits_2_without_showing_it(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any,
        monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", key)
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "pipeline.yaml: call.api_key or OPENAI_API_KEY: the API key" in err
    assert "0123456789" not in err and "Traceback" not in err


def test_credentials_in_the_base_url_exit_2_and_are_never_stored_or_shown(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    url = simulator.url.replace("http://", "http://user:sk-in-the-url-998877@")
    pipeline = make_pipeline(base_url=url)
    for args in ((), ("--dry-run",)):
        assert pipeline.run(*args) == 2
        captured = capsys.readouterr()
        assert "credentials in the URL" in captured.err
        assert "998877" not in captured.err + captured.out
    assert not pipeline.store.exists() or b"998877" not in pipeline.store.read_bytes()


def test_export_to_a_folder_or_an_unwritable_place_exits_2(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any, tmp_path: Path) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target, message in ((tmp_path, "is a folder; name the file"),
                            (blocker / "out.jsonl", "cannot write there")):
        assert pipeline.cli("export", "-o", str(target)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_call_headers_are_sent_but_never_stored_hashed_or_shown(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TOKEN", "gw-token-first-4455")
    rows = [*questions(3), {"id": "echo", "question": "[sim:status=400-echo] hi"},
            {"id": "echo-ok", "question": "[sim:echo] hi"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"headers": {"X-Gateway-Key": "${GATEWAY_TOKEN}"}})
    assert pipeline.run() == 1  # the echo row fails, quoting the headers it was sent
    assert simulator.stats.last_headers["x-gateway-key"] == "gw-token-first-4455"
    assert pipeline.run("--dry-run") == 0
    for command in ("status", "show", "failures", "export"):
        pipeline.cli(command, *(["echo-ok"] if command == "show" else []))
    captured = capsys.readouterr()
    assert "4455" not in captured.out + captured.err
    assert "x-gateway-key: [REDACTED]" in captured.out  # a 200 reply quoting it
    for path in pipeline.folder.glob("flow.db*"):
        assert b"4455" not in path.read_bytes(), path
    # a rotated token is the same request: nothing is paid again
    monkeypatch.setenv("GATEWAY_TOKEN", "gw-token-second-6677")
    sent = simulator.stats.requests
    assert pipeline.run() == 1
    assert simulator.stats.requests == sent + 1  # only the failed row is sent again


def test_two_pipelines_on_one_store_are_refused_and_a_renamed_one_takes_it_over(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    first = make_pipeline(base_url=simulator.url)
    assert first.run() == 0
    before = first.export(capsys)
    second_file = first.folder / "other.yaml"
    second_file.write_text(first.file.read_text().replace("rows.jsonl", "other.jsonl"))
    write_rows(first.folder / "other.jsonl", [{"id": "q00001", "question": "Something else?"}])
    capsys.readouterr()
    assert main(["run", str(second_file)]) == 2
    err = capsys.readouterr().err
    assert "this store holds the items of another pipeline" in err and "pipeline.yaml" in err
    assert "--take-over-store" in err
    assert first.export(capsys) == before
    # the first pipeline's file renamed: its store follows it
    renamed = first.folder / "renamed.yaml"
    first.file.rename(renamed)
    assert main(["run", str(renamed)]) == 0
    assert main(["run", str(second_file), "--take-over-store"]) == 0
    assert first.query("SELECT item_id FROM items") == [("q00001",)]


def test_a_mistyped_command_gets_a_suggestion(make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline()
    pipeline.write()
    assert main(["stauts", str(pipeline.file)]) == 2
    assert "unknown command 'stauts'; did you mean 'status'?" in capsys.readouterr().err
    assert main(["failures", "--help"]) == 0
    assert "only failures of this class" in capsys.readouterr().out


def test_status_counts_rows_no_run_has_read_and_names_simulated_results(
        make_pipeline: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = make_pipeline(rows=questions(2500))
    assert pipeline.run("--simulate", "--limit", "5") == 0
    err = capsys.readouterr().err
    assert "--limit 5: the run stopped there; the items after are left pending" in err
    # the read commands need no API key
    monkeypatch.delenv("OPENAI_API_KEY")
    assert pipeline.cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["input_rows"] == 2500 and status["done"] == 5
    assert status["pending"] == 2495 and status["not_read"] == 2500 - status["items"] > 0
    assert pipeline.cli("status") == 0
    out = capsys.readouterr().out
    assert "not read by any run yet" in out
    assert "5 done items came from flow's simulator (--simulate)" in out
    for command, args in (("export", ()), ("failures", ()), ("show", ("q00001",))):
        assert pipeline.cli(command, *args) == 0


def test_progress_shows_spend_against_the_cap_and_a_projected_total(make_pipeline: Any) -> None:
    from conftest import flow_process

    from flow.progress import RunProgress, cost_text
    pipeline = make_pipeline(call={"max_cost_usd": 5.0,
                                   "price": {"input_per_1m": 1, "output_per_1m": 1}})
    child = flow_process(pipeline, "--simulate")
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0 and "$0.00 of $5.00" in err
    progress = RunProgress(total=100, done=20, completed=20, cost_usd=0.4, cap_usd=5.0,
                           spent_before_usd=0.8)
    assert cost_text(progress) == "$1.20 of $5.00 (~$2.00 projected for the run)"
    assert cost_text(RunProgress(total=10, done=10, completed=10, cost_usd=0.5)) == "$0.5000"


def test_export_carries_the_input_and_takes_its_format_from_the_file_name(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "question": f"q{i}", "stars": i, "status": "vip"} for i in range(3)]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 0
    records = pipeline.export(capsys)
    assert list(records[0]) == ["id", "question", "stars", "input.status", "status", "output",
                                "truncated", "error_class", "error"]
    assert (records[2]["stars"], records[2]["input.status"]) == (2, "vip")
    out = tmp_path / "out.csv"
    assert pipeline.cli("export", "-o", str(out), "--fields", "id,stars,stars") == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "id,stars,status,output,truncated,error_class,error"
    assert lines[1].startswith("r0,0,done,")
    assert pipeline.cli("export", "-o", str(out), "--no-input") == 0
    assert out.read_text().splitlines()[0] == "id,status,output,truncated,error_class,error"
    capsys.readouterr()
    assert pipeline.cli("export", "-o", str(out), "--format", "jsonl") == 2
    assert "names a .csv file" in capsys.readouterr().err


def test_simulate_answers_a_one_word_label_within_twenty_tokens_and_a_schema_in_its_shape(
        make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline(rows=questions(5), post=["json"], call={
        "messages": [{"role": "system", "content": 'Reply as JSON {"label": ...}: positive, '
                                                   "negative or neutral."},
                     {"role": "user", "content": "{{ question }}"}],
        "params": {"max_tokens": 20, "response_format": {"type": "json_object"}}})
    assert pipeline.run("--simulate") == 0
    records = pipeline.export(capsys)
    assert [r["truncated"] for r in records] == [False] * 5
    assert {r["output"]["label"] for r in records} <= {"positive", "negative", "neutral"}
    schema = {"type": "object", "additionalProperties": False, "required": ["stars", "tags"],
              "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                             "tags": {"type": "array", "items": {"type": "string"},
                                      "minItems": 1}}}
    pipeline.config["call"]["params"] = {"max_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "review", "strict": True,
                                               "schema": schema}}}
    assert pipeline.run("--simulate") == 0
    for record in pipeline.export(capsys):
        assert set(record["output"]) == {"stars", "tags"} and 1 <= record["output"]["stars"] <= 5
        assert record["output"]["tags"] and not record["truncated"]
