"""Never lose work, never leak a key: kills, signals, server faults, machine faults, secrets.

Everything runs the real flow against the simulator over loopback HTTP.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    Pipeline,
    flow_process,
    kill_mid_run,
    questions,
    wait_for_line,
    wait_for_requests,
)

from flow.simulator import SimulatorConfig, SimulatorThread

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_twenty_kills_at_random_moments_lose_nothing_and_pay_nothing_twice() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "crash.py"), "--kills", "20",
                           "--items", "2000", "--concurrency", "16", "--latency-ms", "20",
                           "--most-s", "0.4"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exported 2000 once each" in done.stdout


def running_with_every_call_in_flight(make_pipeline: Any, server: SimulatorThread, rows: int,
                                      drain_s: float) -> tuple[Any, subprocess.Popen[str]]:
    """A run against a server that never answers, once all its 8 workers have a call out."""
    pipeline = make_pipeline(rows=questions(rows), base_url=server.url,
                             call={"concurrency": 8, "drain_s": drain_s, "timeout_s": 60,
                                   "rpm": 60_000})
    child = flow_process(pipeline)
    wait_for_requests(server, min(rows, 8))
    return pipeline, child


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_keeping_what_was_received(make_pipeline: Any) -> None:
    # replies never come: only the second Ctrl-C can end the run before drain_s (60 s)
    with SimulatorThread(SimulatorConfig(hang_rate=1.0)) as server:
        pipeline, child = running_with_every_call_in_flight(make_pipeline, server, 100, 60)
        child.send_signal(signal.SIGINT)
        wait_for_line(child, "stopping")
        child.send_signal(signal.SIGINT)
        assert child.wait(20) == 130
        assert pipeline.query("SELECT state FROM runs") == [("interrupted",)]
        with sqlite3.connect(pipeline.store) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_stop_with_every_remaining_item_in_flight_ends_after_drain_s(
        make_pipeline: Any) -> None:
    # the tail of every run, or an input smaller than concurrency: the replies never come
    with SimulatorThread(SimulatorConfig(hang_rate=1.0)) as server:
        pipeline, child = running_with_every_call_in_flight(make_pipeline, server, 6, 0.5)
        child.send_signal(signal.SIGINT)
        assert child.wait(20) == 130
        # ended by the drain, not by the watchdog (which leaves the run `running`)
        assert pipeline.query("SELECT state FROM runs") == [("interrupted",)]
        assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'pending'") == [(6,)]
        assert server.stats.requests == 6


@pytest.mark.slow
def test_sigterm_drains_like_ctrl_c(make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=300)) as server:
        pipeline = make_pipeline(rows=questions(300), base_url=server.url,
                                 call={"concurrency": 8})
        child = flow_process(pipeline)
        wait_for_requests(server, 16)
        child.send_signal(signal.SIGTERM)
        assert child.wait(20) == 130
        sent = server.stats.requests
        assert pipeline.query("SELECT COUNT(*) FROM responses")[0][0] == sent
        server.config.latency_ms = 10  # the resume only has to end with the rest done
        again = flow_process(pipeline)
        assert again.wait(60) == 0
        assert server.stats.requests == 300


def test_server_faults_follow_the_documented_policy(make_pipeline: Any, simulator:
                                                    SimulatorThread, capsys: Any) -> None:
    asks = {
        "malformed-once": "[sim:malformed*1] retried",
        "cut-once": "[sim:cut*1] retried",
        "no-finish-once": "[sim:finish=none*1] retried",
        "malformed-always": "[sim:malformed] given up",
        "length": "[sim:finish=length] kept",
        "filtered": "[sim:finish=content_filter] kept",
        "huge": "[sim:huge] bounded",
        "forbidden": "[sim:status=403] failed at once",
        "conflict-once": "[sim:status=409*1] retried",
        "garbage-once": "[sim:garbage*1] retried",
        "garbage-always": "[sim:garbage] given up",
    }
    rows = [{"id": key, "question": ask} for key, ask in asks.items()]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"retry": {"max_tries": 3, "max_time_s": 30},
                                   "max_response_bytes": 1_000_000})
    assert pipeline.run() == 1
    results = {r["id"]: r for r in pipeline.export(capsys)}
    for key in ("malformed-once", "cut-once", "no-finish-once", "conflict-once", "garbage-once"):
        assert results[key]["status"] == "done", results[key]
    assert results["malformed-always"]["error_class"] == "ResponseError"
    assert "gave up after 3 attempts" in results["malformed-always"]["error"]
    assert "(call.retry.max_tries is 3)" in results["malformed-always"]["error"]
    assert results["length"]["status"] == "done" and results["length"]["truncated"] is True
    assert "content_filter" in results["filtered"]["error"]
    assert "larger than call.max_response_bytes" in results["huge"]["error"]
    assert results["forbidden"]["error_class"] == "PermissionDeniedError"
    assert results["garbage-always"]["error_class"] == "APIConnectionError"
    assert "Bad status line" in results["garbage-always"]["error"]
    kept = dict(pipeline.query(
        "SELECT item_id, response_id IS NOT NULL FROM results WHERE status = 'failed'"))
    assert kept == {"filtered": 1, "huge": 1, "malformed-always": 0, "forbidden": 0,
                    "garbage-always": 0}

    before = dict(simulator.stats.by_request)
    assert pipeline.run() == 1
    keys = dict(pipeline.query("SELECT item_id, request_key FROM items"))
    called_again = {item for item, key in keys.items()
                    if simulator.stats.by_request[key] > before.get(key, 0)}
    assert called_again == {"malformed-always", "forbidden", "garbage-always"}


def test_an_outage_of_503s_is_ridden_out(make_pipeline: Any, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(outages=[(0.0, 1.0)])) as server:
        pipeline = make_pipeline(rows=questions(40), base_url=server.url,
                                 call={"retry": {"max_tries": 40, "max_time_s": 60,
                                                 "first_wait_s": 0.05, "max_wait_s": 0.25}})
        assert pipeline.run() == 0
        assert server.stats.by_status[503] > 0
        assert {r["status"] for r in pipeline.export(capsys)} == {"done"}


def test_store_locked_by_another_program_ends_clearly_and_loses_nothing(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url, store_busy_timeout_s=0.2)
    assert pipeline.run("--limit", "5") == 0
    holder = sqlite3.connect(pipeline.store, isolation_level=None, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert pipeline.run() == 2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    assert "another program" in err and "write lock" in err and "Traceback" not in err
    assert pipeline.query("SELECT COUNT(*) FROM results WHERE status='done'") == [(5,)]
    assert pipeline.run() == 0


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder`, which no one may write to inside the block: a read-only bind mount of it as
    root (who ignores permissions), else its permissions."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
            yield folder
        finally:
            # lazily: a file still open in it (a failing test) must not keep it mounted
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """An empty folder no one may write to."""
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder):
        yield folder


def test_read_only_store_folder_is_a_clear_error(make_pipeline: Any, read_only_folder: Path,
                                                 capsys: Any) -> None:
    pipeline = make_pipeline(store=str(read_only_folder / "flow.db"))
    assert pipeline.run("--simulate") == 2
    err = capsys.readouterr().err
    assert "flow.db" in err and ("Read-only" in err or "Permission denied" in err)
    assert "Traceback" not in err


READ_COMMANDS = (("status", "--json"), ("export",), ("export", "--format", "csv"),
                 ("failures", "--json"), ("show", "q00001"), ("show", "bad"),
                 ("run", "--dry-run"))


def read_everything(pipeline: Pipeline, capsys: Any) -> dict[tuple[str, ...], tuple[int, str]]:
    """Each read command's exit code and output (errors included)."""
    seen = {}
    capsys.readouterr()
    for command in READ_COMMANDS:
        code = pipeline.cli(*command)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        seen[command] = (code, captured.out + captured.err)
    return seen


def test_read_commands_work_on_a_store_in_a_read_only_folder(
        make_pipeline: Any, simulator: SimulatorThread, tmp_path: Path, capsys: Any) -> None:
    rows = [{"id": "bad", "question": "[sim:status=400]"}, *questions(6)]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             store=str(tmp_path / "data" / "flow.db"))
    assert pipeline.run("--limit", "5") == 1
    assert sorted(os.listdir(tmp_path / "data")) == ["flow.db"]  # the pid file goes with its run
    with read_only(tmp_path / "data"):
        seen = read_everything(pipeline, capsys)
    writable = read_everything(pipeline, capsys)
    assert seen == writable
    assert '"done": 4' in writable[("status", "--json")][1]
    assert "BadRequestError" in writable[("failures", "--json")][1]
    assert "4 already done, 3 to call" in writable[("run", "--dry-run")][1]


def test_read_commands_on_a_read_only_folder_see_what_a_killed_run_committed(
        make_pipeline: Any, tmp_path: Path, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=20)) as server:
        pipeline = make_pipeline(rows=questions(400), base_url=server.url,
                                 store=str(tmp_path / "data" / "flow.db"))
        kill_mid_run(pipeline, server, after_requests=40)
    store = pipeline.store
    wal = store.with_name("flow.db-wal")
    assert wal.stat().st_size > 0 and store.with_name("flow.db-shm").exists()
    with read_only(tmp_path / "data"):
        seen = read_everything(pipeline, capsys)
        only_main_file = sqlite3.connect(f"file:{store}?mode=ro&immutable=1", uri=True)
        (in_main_file,) = only_main_file.execute("SELECT COUNT(*) FROM responses").fetchone()
        only_main_file.close()
    status = json.loads(seen[("status", "--json")][1])
    assert [run["state"] for run in status["runs"]] == ["running"]  # no run marked it crashed
    (stored,) = pipeline.query("SELECT COUNT(*) FROM responses")[0]
    assert status["replies_paid"] == stored and in_main_file < stored
    exported = [json.loads(line) for line in seen[("export",)][1].splitlines()]
    assert status["done"] == sum(r["status"] == "done" for r in exported) == stored


def test_read_commands_refuse_clearly_when_commits_in_a_wal_cannot_be_read(
        make_pipeline: Any, tmp_path: Path, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=20)) as server:
        pipeline = make_pipeline(rows=questions(400), base_url=server.url,
                                 store=str(tmp_path / "data" / "flow.db"))
        kill_mid_run(pipeline, server, after_requests=40)
    pipeline.store.with_name("flow.db-shm").unlink()  # a copy made without it
    with read_only(tmp_path / "data"):
        seen = read_everything(pipeline, capsys)
    for command in READ_COMMANDS:
        code, text = seen[command]
        assert code == 2, (command, text)
        assert "flow.db-wal holds commits not yet in flow.db" in text, (command, text)
        assert "copy flow.db and flow.db-wal together to a writable folder" in text


def test_disk_full_stops_the_run_clearly_and_the_store_stays_consistent(
        make_pipeline: Any) -> None:
    with SimulatorThread() as server:
        rows = [{"id": f"q{i:05d}", "question": f"{i} " + "long question " * 10}
                for i in range(400)]
        pipeline = make_pipeline(rows=rows, base_url=server.url)
        pipeline.write()
        limit = 400_000

        def tiny_disk() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        child = subprocess.run([sys.executable, "-m", "flow", "run", str(pipeline.file)],
                               capture_output=True, text=True, preexec_fn=tiny_disk,
                               env={**os.environ, "OPENAI_API_KEY": API_KEY}, timeout=120)
        assert child.returncode == 2, child.stderr
        assert "the disk is full or refused the write" in child.stderr
        assert "everything committed before is safe" in child.stderr
        assert "Traceback" not in child.stderr
        with sqlite3.connect(pipeline.store) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            kept = db.execute("SELECT COUNT(*) FROM results WHERE status='done'").fetchone()[0]
        assert 0 < kept < 400
        assert pipeline.run() == 0
        assert pipeline.query("SELECT COUNT(*) FROM results WHERE status='done'") == [(400,)]
        assert server.stats.requests <= 400 + 8


FEW_FILES_CHILD = """
import os, resource, sys
import flow.cli
# the files open once flow is imported, and a few more
limit = len(os.listdir("/dev/fd")) - 1 + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
sys.exit(flow.cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("more_files", [4, 6, 8, 10, 12, 14])
def test_running_out_of_open_files_stops_clearly_and_keeps_every_reply(
        make_pipeline: Any, more_files: int) -> None:
    # from too few to read the input, through the store, to the connections
    with SimulatorThread(SimulatorConfig(latency_ms=20)) as server:
        pipeline = make_pipeline(rows=questions(200), base_url=server.url,
                                 call={"concurrency": 8})
        pipeline.write()
        child = subprocess.run(
            [sys.executable, "-c", FEW_FILES_CHILD, str(more_files), "run", str(pipeline.file)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "OPENAI_API_KEY": API_KEY})
        assert child.returncode == 2, child.stderr
        assert "too many open files" in child.stderr, child.stderr
        assert "`ulimit -n`" in child.stderr and "call.concurrency" in child.stderr
        assert "Traceback" not in child.stderr
        sent = server.stats.requests
        if sent:
            assert pipeline.query("SELECT state FROM runs") == [("stopped",)]
            assert pipeline.query("SELECT COUNT(*) FROM responses") == [(sent,)]
            assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'failed'") == [
                (0,)]
        assert pipeline.run() == 0
        assert server.stats.requests == 200


def every_artefact(pipeline: Pipeline, capsys: Any, outputs: list[str]) -> str:
    texts = list(outputs)
    for command in (("status",), ("status", "--json"), ("failures",), ("export",),
                    ("export", "--format", "csv")):
        pipeline.cli(*command)
        captured = capsys.readouterr()
        texts += [captured.out, captured.err]
    for (item_id,) in pipeline.query("SELECT item_id FROM items"):
        pipeline.cli("show", item_id)
        captured = capsys.readouterr()
        texts += [captured.out, captured.err]
    for path in pipeline.folder.iterdir():
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


def test_the_key_appears_in_no_artefact_even_when_the_server_echoes_it(
        make_pipeline: Any, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(api_key="sk-the-right-one")) as server:
        pipeline = make_pipeline(base_url=server.url)
        assert pipeline.run() == 2
        captured = capsys.readouterr()
        assert "refused the API key" in captured.err
        everything = every_artefact(pipeline, capsys, [captured.out, captured.err])
        assert API_KEY not in everything


def test_the_key_appears_in_no_artefact_of_a_run_with_failures(make_pipeline: Any,
                                                                capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(api_key=API_KEY)) as server:
        rows = questions(5) + [{"id": "bad", "question": "[sim:status=400]"}]
        pipeline = make_pipeline(rows=rows, base_url=server.url)
        assert pipeline.run() == 1
        captured = capsys.readouterr()
        everything = every_artefact(pipeline, capsys, [captured.out, captured.err])
        assert "Simulated reply" in everything
        assert API_KEY not in everything


def test_ctrl_c_starts_no_new_request_and_keeps_every_reply_in_flight(
        make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=200)) as server:
        pipeline = make_pipeline(rows=questions(400), base_url=server.url,
                                 call={"concurrency": 4, "drain_s": 5})
        child = flow_process(pipeline)
        wait_for_requests(server, 12)
        sent = server.stats.requests
        child.send_signal(signal.SIGINT)
        assert child.wait(20) == 130
        # a worker may have taken its next call in the instant before the signal
        assert server.stats.requests <= sent + 4
        assert pipeline.query("SELECT COUNT(*) FROM responses") == [(server.stats.requests,)]


def test_a_row_with_half_a_character_fails_alone(make_pipeline: Any, simulator:
                                                 SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    rows = pipeline.folder / "rows.jsonl"
    rows.write_text('{"id": "a", "question": "fine"}\n'
                    '{"id": "b", "question": "half \\ud83d an emoji"}\n'
                    '{"id": "c", "question": "whole \\ud83d\\ude00 emoji"}\n')
    assert pipeline.run() == 1
    results = pipeline.export(capsys)
    assert [r["status"] for r in results] == ["done", "failed", "done"]
    assert "half a character" in results[1]["error"]
    assert pipeline.query("SELECT state FROM runs") == [("finished",)]


@pytest.mark.parametrize("post", [["strip"], ["json"]])
def test_half_a_character_in_a_reply_is_kept_and_the_run_goes_on(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any, post: list[str]) -> None:
    # a reply, or the JSON in it, holding half an emoji (\\ud83d): once it killed the writer
    rows = [{"id": f"h{i}", "question": f"[sim:half] {i}"} for i in range(3)]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url, post=post)
    assert pipeline.run() == 0
    text = '{"text": "half \ud83d an emoji"}'
    output = json.loads(text) if post == ["json"] else text
    assert [(r["status"], r["output"]) for r in pipeline.export(capsys)] == [
        ("done", output)] * 3
    assert pipeline.query("SELECT state FROM runs") == [("finished",)]
    assert pipeline.run() == 0
    assert simulator.stats.requests == 3


def test_ctrl_c_sends_nothing_the_rate_limiter_was_holding_back(make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig()) as server:
        pipeline = make_pipeline(rows=questions(100), base_url=server.url,
                                 call={"concurrency": 8, "rpm": 120, "drain_s": 10})
        child = flow_process(pipeline)
        wait_for_requests(server, 2)
        sent = server.stats.requests
        child.send_signal(signal.SIGINT)
        assert child.wait(20) == 130
        # one may have been on its way; 8 were waiting: at 2 a second, they would all go
        assert server.stats.requests <= sent + 2
        assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'pending'") == [
            (100 - server.stats.requests,)]


def test_a_key_a_server_echoes_is_never_kept_not_even_in_part(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-" + "k" * 39  # 42 characters, as in the report
    monkeypatch.setenv("OPENAI_API_KEY", key)
    rows = questions(3)
    rows[1]["question"] = "[sim:status=400-echo]"
    rows[2]["question"] = "[sim:echo]"  # a 200 reply quoting the Authorization header
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 1
    with sqlite3.connect(pipeline.store) as db:
        dump = "\n".join(db.iterdump())
    assert "kkkkk" not in dump
    assert pipeline.export(capsys)[2]["output"].endswith(
        "You sent: Authorization: Bearer [REDACTED]")
    assert "You sent: Authorization: Bearer [REDAC" in dump, dump[dump.find("You sent"):][:80]  # the key straddled the 500-character cut
    capsys.readouterr()
    assert pipeline.cli("failures") == 0
    assert "kkkkk" not in capsys.readouterr().out


@pytest.mark.parametrize("latency_ms", [0, 400])  # Ctrl-C during the waits, or in flight
def test_ctrl_c_does_not_wait_for_retries_of_items_that_keep_failing(
        make_pipeline: Any, latency_ms: int) -> None:
    rows = [{"id": f"e{i}", "question": f"[sim:status=500] q{i}"} for i in range(6)]
    with SimulatorThread(SimulatorConfig(latency_ms=latency_ms)) as server:
        pipeline = make_pipeline(rows=rows, base_url=server.url, call={
            "concurrency": 8, "rpm": 60_000, "drain_s": 60,
            "retry": {"max_tries": 50, "first_wait_s": 30, "max_wait_s": 30}})
        child = flow_process(pipeline)
        wait_for_requests(server, 6)  # every item sent once: waiting to retry, or in flight
        sent = server.stats.requests
        child.send_signal(signal.SIGINT)
        assert child.wait(10) == 130  # not the up-to-30 s waits, nor drain_s
        assert server.stats.requests <= sent + 1  # a wait may have been near 0
        assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'pending'") == [(6,)]


def test_a_retry_after_longer_than_any_item_may_wait_stops_the_run_clearly(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = questions(3)
    rows[1]["question"] = "[sim:status=429-day]"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"concurrency": 1, "rpm": 60_000})
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "86,400 s" in err and "max_time_s" in err and "Traceback" not in err
    assert pipeline.query("SELECT state FROM runs") == [("stopped",)]
    assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'done'") == [(1,)]


def test_a_long_retry_after_is_waited_only_up_to_max_wait_s(make_pipeline: Any,
                                                            simulator: SimulatorThread) -> None:
    # 500 s asked, within max_time_s: neither the item nor the run waits longer than
    # max_wait_s (0 in tests)
    rows = questions(3)
    rows[1]["question"] = "[sim:status=429-500*1] once"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"concurrency": 1, "rpm": 60_000, "retry": {"max_time_s": 600}})
    child = flow_process(pipeline)
    assert child.wait(30) == 0
    assert simulator.stats.by_status[429] == 1
    assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'done'") == [(3,)]


def test_timeout_bounds_the_whole_request_not_each_read(make_pipeline: Any, simulator:
                                                        SimulatorThread, capsys: Any) -> None:
    # a byte every 50 ms: no single read waits long, the whole body would take seconds
    simulator.config.drip_s = 0.05
    pipeline = make_pipeline(rows=[{"id": "slow", "question": "[sim:drip] hello"}],
                             base_url=simulator.url,
                             call={"timeout_s": 0.5, "retry": {"max_tries": 1}})
    assert pipeline.run() == 1
    [row] = pipeline.export(capsys)
    assert row["error_class"] == "APITimeoutError", row
    assert "no response within 0.5 s" in row["error"]


def test_slow_post_steps_and_templates_fail_their_item_alone(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    folder = make_pipeline().folder
    (folder / "steps.py").write_text(
        "import time\n\ndef stall(text):\n    if 'q00001' in text:\n        time.sleep(3600)\n"
        "    return text\n\ndef spin(text):\n    while 'q00002' in text:\n        pass\n"
        "    return text\n")
    rows = [{**row, "question": f"{row['id']} {row['question']}"} for row in questions(6)]
    rows[3]["question"] = "a" * 40 + "b"  # a catastrophic regex on its echo
    rows[4]["loops"] = 100_000  # a template that loops 10^10 times without output
    pipeline = make_pipeline(
        rows=rows, base_url=simulator.url, step_timeout_s=0.3,
        call={"messages": [{"role": "user", "content": "{{ question }}{% for a in range("
                            "loops | default(0)) %}{% for b in range(loops) %}{% endfor %}"
                            "{% endfor %}"}]},
        post=[{"python": "steps:stall"}, {"python": "steps:spin"},
              {"regex": "^(Simulated).*?(?:(a+)+c)?$"}])
    assert pipeline.run() == 1
    results = {r["id"]: r for r in pipeline.export(capsys)}
    for item in ("q00001", "q00002", "q00003"):
        assert "took longer than 0.3 s on this reply (step_timeout_s)" in results[item]["error"]
    assert "took longer than 0.3 s to render (step_timeout_s)" in results["q00004"]["error"]
    assert [results[i]["status"] for i in ("q00000", "q00005")] == ["done", "done"], results


@pytest.mark.parametrize("step", ["sleep", "regex"])  # a regex holds the GIL, inside C code
@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_ends_the_run_even_while_a_post_step_holds_the_process(
        make_pipeline: Any, signals: int, step: str) -> None:
    # the step never returns and its bound is an hour: only the stop's own deadline helps
    with SimulatorThread(SimulatorConfig()) as server:
        rows = [{**row, "question": "a" * 40 + "b"} for row in questions(3)]
        post = ([{"python": "steps:stall"}] if step == "sleep" else
                [{"regex": "^(Simulated).*?(?:(a+)+c)?$"}])  # catastrophic on the echo
        pipeline = make_pipeline(rows=rows, base_url=server.url, step_timeout_s=3600,
                                 call={"drain_s": 0.2}, post=post)
        (pipeline.folder / "steps.py").write_text(
            "import time\n\ndef stall(text):\n    time.sleep(3600)\n")
        child = flow_process(pipeline)
        wait_for_requests(server, 1)
        time.sleep(0.2)  # the first reply is in its post step
        for _ in range(signals):
            child.send_signal(signal.SIGINT)
            time.sleep(0.2)  # two signals at once would be one
        # the step is ended when drain_s is up, at once on a second Ctrl-C
        assert child.wait(15 if signals == 1 else 4) == 130
        assert child.stderr is not None
        assert "run the same command again to resume" in child.stderr.read()
        with sqlite3.connect(pipeline.store) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # the reply whose post step was ended is kept, its item failed saying why
        stopped = pipeline.query("SELECT error, response_id IS NOT NULL FROM results "
                                 "WHERE status = 'failed'")
        assert stopped and all("stopped while the post steps ran" in error and kept
                               for error, kept in stopped), stopped
        assert pipeline.query("SELECT state FROM runs") == [("interrupted",)]


def test_an_item_given_up_on_max_time_s_says_so_not_max_tries(make_pipeline: Any, simulator:
                                                              SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(rows=[{"id": "hung", "question": "[sim:hang] hello"}],
                             base_url=simulator.url,
                             call={"timeout_s": 0.3, "retry": {"max_tries": 50, "max_time_s": 1}})
    assert pipeline.run() == 1
    [row] = pipeline.export(capsys)
    assert row["error_class"] == "APITimeoutError", row
    assert "(call.retry.max_time_s is 1 s)" in row["error"] and "max_tries" not in row["error"]
