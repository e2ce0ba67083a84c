"""The Batch API executor end to end: the real openai SDK against the simulator's Files and
Batch API, on the same store and content keys as online calls; never a second batch for a
shard, whatever moment the process dies."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
from conftest import Pipeline, flow_process, questions

from flow.prices import cost_usd, price_for
from flow.simulator import SimulatorConfig, SimulatorThread

FAST = {"first_poll_s": 0.01, "max_poll_s": 0.05, "gather_s": 0.05, "create_grace_s": 0}


@pytest.fixture
def batch_server() -> Any:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2)) as server:
        yield server


def batch_pipeline(make_pipeline: Any, server: SimulatorThread, items: int = 120,
                   per_batch: int = 40, **batch: Any) -> Pipeline:
    return make_pipeline(rows=questions(items), base_url=server.url, call={
        "executor": "batch", "batch": {"max_requests_per_batch": per_batch, **FAST, **batch}})


def creates(server: SimulatorThread) -> dict[str, int]:
    return dict(server.stats.batch_creates)


def done_items(pipeline: Pipeline) -> int:
    ((count,),) = pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'done'")
    return int(count)


def assert_each_reply_once(pipeline: Pipeline) -> None:
    assert pipeline.query("SELECT COUNT(*) - COUNT(DISTINCT request_key) FROM responses") == [
        (0,)]


def test_120_items_in_3_batches_at_half_the_online_price(make_pipeline: Any,
                                                         batch_server: SimulatorThread,
                                                         capsys: Any) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server)
    assert pipeline.run() == 0
    assert sorted(creates(batch_server).values()) == [1, 1, 1]
    assert batch_server.stats.requests == 0  # nothing went online
    assert done_items(pipeline) == 120
    assert [r["status"] for r in pipeline.export(capsys)] == ["done"] * 120
    price = price_for("gpt-4o-mini", None)
    replies = pipeline.query("SELECT prompt_tokens, completion_tokens, cost_usd, batch_id "
                             "FROM responses")
    assert len(replies) == 120 and all(batch_id for *_, batch_id in replies)
    for prompt, completion, cost, _ in replies:
        assert cost == pytest.approx(cost_usd(price, prompt, completion) / 2)
    assert pipeline.query("SELECT state, lines FROM batches") == [("collected", 40)] * 3
    assert pipeline.run() == 0  # a re-run: nothing to send, no batch made
    assert sorted(creates(batch_server).values()) == [1, 1, 1]


@pytest.mark.parametrize("moment", ["uploaded", "intent", "created", "downloading",
                                    "collecting"])
def test_a_kill_at_any_step_never_creates_a_second_batch(
        make_pipeline: Any, batch_server: SimulatorThread, moment: str) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server)
    child = flow_process(pipeline, env={"FLOW_CRASH_AT": moment})
    child.wait(60)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    assert pipeline.run() == 0  # the resume, in this process
    assert len(creates(batch_server)) == 3 and set(creates(batch_server).values()) == {1}
    assert done_items(pipeline) == 120
    assert_each_reply_once(pipeline)


def test_a_create_whose_answer_is_lost_is_found_not_made_again(
        make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2,
                                         batch_faults={1: "drop-create"})) as server:
        pipeline = batch_pipeline(make_pipeline, server)
        assert pipeline.run() == 0
        assert len(creates(server)) == 3 and set(creates(server).values()) == {1}
        assert done_items(pipeline) == 120
        assert_each_reply_once(pipeline)


def test_an_expired_batch_keeps_what_it_did_and_requeues_the_rest(make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2,
                                         batch_faults={1: "expire:60"})) as server:
        pipeline = batch_pipeline(make_pipeline, server, items=100, per_batch=100)
        assert pipeline.run() == 0
        assert done_items(pipeline) == 100
        assert sum(creates(server).values()) == 2  # the expired shard, then its 40 again
        assert pipeline.query("SELECT lines, status FROM batches ORDER BY id") == [
            (100, "expired"), (40, "completed")]
        assert_each_reply_once(pipeline)  # each line paid once
        ((attempts,),) = pipeline.query("SELECT MAX(attempts) FROM outputs")
        assert attempts <= 1


def test_expired_lines_can_finish_online(make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2,
                                         batch_faults={1: "expire:30"})) as server:
        pipeline = batch_pipeline(make_pipeline, server, items=50, per_batch=50,
                                  on_expired="online")
        assert pipeline.run() == 0
        assert done_items(pipeline) == 50
        assert sum(creates(server).values()) == 1 and server.stats.requests == 20
        ((online,),) = pipeline.query("SELECT COUNT(*) FROM responses WHERE batch_id IS NULL")
        assert online == 20


def test_detach_then_a_rerun_an_hour_later_collects_without_creating(
        make_pipeline: Any, batch_server: SimulatorThread, capsys: Any) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server)
    assert pipeline.run("--detach") == 0
    assert "run the same command again to collect" in capsys.readouterr().err
    assert sorted(creates(batch_server).values()) == [1, 1, 1] and done_items(pipeline) == 0
    assert pipeline.query("SELECT DISTINCT state FROM batches") == [("submitted",)]
    batch_server.advance(3600)
    assert pipeline.run() == 0
    assert sorted(creates(batch_server).values()) == [1, 1, 1]
    assert done_items(pipeline) == 120


def test_a_mixed_store_does_each_item_once(make_pipeline: Any, batch_server: SimulatorThread,
                                           capsys: Any) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server)
    pipeline.config["call"]["executor"] = "online"
    assert pipeline.run("--limit", "60") == 0
    assert batch_server.stats.requests == 60
    pipeline.config["call"]["executor"] = "batch"
    assert pipeline.run() == 0
    assert batch_server.stats.requests == 60 and sum(creates(batch_server).values()) == 2
    exported = pipeline.export(capsys)
    assert [r["id"] for r in exported] == [f"q{i:05d}" for i in range(120)]
    assert {r["status"] for r in exported} == {"done"}
    assert_each_reply_once(pipeline)
    ((through_batch,),) = pipeline.query(
        "SELECT COUNT(*) FROM responses WHERE batch_id IS NOT NULL")
    assert through_batch == 60


def test_a_batch_failing_validation_fails_every_line_with_its_reason(
        make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2,
                                         batch_faults={1: "fail-validation:3"})) as server:
        pipeline = batch_pipeline(make_pipeline, server, items=10, per_batch=10)
        assert pipeline.run() == 1
        errors = pipeline.query("SELECT DISTINCT error_class, error FROM results")
        assert len(errors) == 1 and errors[0][0] == "BatchError"
        assert "the batch failed" in errors[0][1] and "line 3" in errors[0][1]
        assert pipeline.run() == 0  # failed without a paid reply: sent again, in a new batch
        assert done_items(pipeline) == 10


def test_a_token_limit_defers_the_batch_without_failing_its_lines(make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2,
                                         batch_faults={1: "token-limit"})) as server:
        pipeline = batch_pipeline(make_pipeline, server, items=10, per_batch=10)
        assert pipeline.run() == 0
        assert done_items(pipeline) == 10
        assert pipeline.query("SELECT COUNT(*) FROM results WHERE status = 'failed'") == [(0,)]


def test_a_per_line_error_fails_that_item_alone(make_pipeline: Any,
                                                batch_server: SimulatorThread) -> None:
    rows = questions(10)
    rows[4]["question"] = "[sim:status=400] What is 4 plus 4?"
    pipeline = make_pipeline(rows=rows, base_url=batch_server.url, call={
        "executor": "batch", "batch": FAST})
    assert pipeline.run() == 1
    failed = pipeline.query("SELECT item_id, error_class FROM results WHERE status = 'failed'")
    assert failed == [("q00004", "BadRequestError")]
    assert done_items(pipeline) == 9


def test_status_and_show_tell_about_the_batches(make_pipeline: Any,
                                                batch_server: SimulatorThread,
                                                capsys: Any) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server)
    assert pipeline.run() == 0
    capsys.readouterr()
    assert pipeline.cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert [b["state"] for b in status["batches"]] == ["collected"] * 3
    assert sum(b["lines"] for b in status["batches"]) == 120
    assert sum(b["cost_usd"] for b in status["batches"]) == pytest.approx(status["cost_usd"],
                                                                          abs=1e-6)
    assert pipeline.cli("show", "q00005") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["batch_id"].startswith("batch_")


def test_cancel_keeps_what_the_batches_finished(make_pipeline: Any, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=3600)) as server:
        pipeline = batch_pipeline(make_pipeline, server, items=40, per_batch=40)
        assert pipeline.run("--detach") == 0
        server.advance(1800)  # half the lines done
        env = {"OPENAI_BASE_URL": server.url}
        os.environ.update(env)
        try:
            pipeline.config["call"]["base_url"] = server.url
            assert pipeline.cli("cancel") == 0
        finally:
            for name in env:
                os.environ.pop(name)
        assert ": cancelling" in capsys.readouterr().err
        server.config.batch_s = 0.2
        assert pipeline.run() == 0
        assert done_items(pipeline) == 40
        assert sum(creates(server).values()) == 2
        assert_each_reply_once(pipeline)


def test_a_budget_stops_before_a_batch_that_could_pass_it(make_pipeline: Any,
                                                          batch_server: SimulatorThread) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, items=120, per_batch=40)
    pipeline.config["call"]["params"]["max_tokens"] = 1000
    pipeline.config["call"]["max_cost_usd"] = 0.015  # a batch of 40 at its worst: ~0.012
    assert pipeline.run() == 1
    assert sum(creates(batch_server).values()) == 1
    ((spent,),) = pipeline.query("SELECT SUM(cost_usd) FROM responses")
    assert spent < 0.015



def test_a_batch_stage_hands_its_items_on_to_an_online_stage(
        monkeypatch: pytest.MonkeyPatch, batch_server: SimulatorThread, tmp_path: Any,
        capsys: Any) -> None:
    """A chain whose first stage goes through batches: each item's stage-1 output, matched
    in the store when its batch is collected, renders its stage-2 request."""
    from conftest import API_KEY, write_rows

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    write_rows(tmp_path / "rows.jsonl", questions(30))
    pipeline = Pipeline(tmp_path, {
        "store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
        "defaults": {"model": "gpt-4o-mini", "base_url": batch_server.url, "timeout_s": 5},
        "stages": [
            {"name": "answer", "executor": "batch", "batch": FAST,
             "messages": [{"role": "user", "content": "{{ question }}"}],
             "post": [{"regex": "You asked: (.*)"}]},
            {"name": "grade", "model": "gpt-4o",
             "messages": [{"role": "user", "content": "Grade: {{ answer.output }}"}],
             "post": ["strip"]}]})
    assert pipeline.run() == 0
    assert sum(creates(batch_server).values()) == 1
    assert batch_server.stats.by_model["gpt-4o"] == 30  # every grade went online
    exported = {r["id"]: r for r in pipeline.export(capsys)}
    assert len(exported) == 30 and {r["status"] for r in exported.values()} == {"done"}
    assert "Grade: What is 7 plus 7?" in exported["q00007"]["output"]
    assert pipeline.run() == 0
    assert batch_server.stats.by_model["gpt-4o"] == 30


def test_batches_stay_within_a_known_enqueued_token_limit(make_pipeline: Any) -> None:
    """With the account's enqueued-token limit given, no batch is larger and the batches
    running at once stay within it: the provider never refuses one for its tokens."""
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2,
                                         batch_token_limit=2500)) as server:
        pipeline = batch_pipeline(make_pipeline, server, items=60, per_batch=1000,
                                  max_enqueued_tokens=2500)
        pipeline.config["call"]["params"]["max_tokens"] = 100
        assert pipeline.run() == 0
        assert done_items(pipeline) == 60
        shards = pipeline.query("SELECT lines FROM batches ORDER BY id")
        assert len(shards) >= 3 and sum(lines for (lines,) in shards) == 60
        assert set(creates(server).values()) == {1}  # none refused and made again


def test_a_batch_the_provider_no_longer_has_is_sent_again(make_pipeline: Any) -> None:
    """Detached from one server, resumed at another with the same endpoint_id: the batches
    it knew of are gone (404), so their lines go into new batches; no traceback."""
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=3600)) as first:
        pipeline = batch_pipeline(make_pipeline, first, items=30, per_batch=30)
        pipeline.config["call"]["endpoint_id"] = "my-batches"
        assert pipeline.run("--detach") == 0
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2)) as second:
        pipeline.config["call"]["base_url"] = second.url
        assert pipeline.run() == 0
        assert done_items(pipeline) == 30
        assert sum(creates(second).values()) == 1
    (error,) = pipeline.query("SELECT error FROM batches WHERE id = 1")[0]
    assert error.startswith("lost at the provider") and "30 lines sent again" in error


def test_a_server_without_a_batch_api_stops_the_run_clearly(make_pipeline: Any,
                                                           batch_server: SimulatorThread,
                                                           capsys: Any) -> None:
    pipeline = batch_pipeline(make_pipeline, batch_server, items=5)
    pipeline.config["call"]["base_url"] = batch_server.url + "/no-batches-here"
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "the provider refused it (404" in err and "executor: online" in err
    assert "Traceback" not in err


def test_detach_with_simulate_is_refused(make_pipeline: Any, capsys: Any) -> None:
    pipeline = make_pipeline(call={"executor": "batch"})
    assert pipeline.run("--simulate", "--detach") == 2
    assert "--detach with --simulate" in capsys.readouterr().err
