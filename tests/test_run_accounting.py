"""Money and results have one source: identical requests paid once, post edits and kills
never change what was paid, and every cost figure agrees."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from conftest import Pipeline, kill_mid_run, questions, write_rows

from flow.simulator import SimulatorConfig, SimulatorThread

CLEAN = "def clean(value):\n    return value.replace('Simulated', 'SIMULATED')\n"


def shared_rows(count: int, distinct: int) -> list[dict[str, Any]]:
    """`count` items whose questions repeat every `distinct` rows."""
    return [{"id": f"r{i:05d}", "question": f"What is {i % distinct} squared?"}
            for i in range(count)]


def paid(pipeline: Pipeline) -> list[tuple[Any, ...]]:
    """Every paid reply, as stored."""
    return pipeline.query("SELECT * FROM responses ORDER BY id")


def money(pipeline: Pipeline, capsys: Any) -> dict[str, float]:
    """Every answer the store gives to "what did it cost", to the cent."""
    capsys.readouterr()
    assert pipeline.cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    ((runs,),) = pipeline.query("SELECT COALESCE(SUM(cost_usd), 0) FROM runs")
    ((replies,),) = pipeline.query("SELECT COALESCE(SUM(cost_usd), 0) FROM responses")
    ((results,),) = pipeline.query("SELECT COALESCE(SUM(cost_usd), 0) FROM results")
    return {"status": round(status["cost_usd"], 6), "runs": round(runs, 6),
            "responses": round(replies, 6), "results": round(results, 6),
            "status_results": round(status["cost_of_results_usd"], 6)}


def test_identical_requests_are_paid_once_and_every_item_gets_the_reply(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(rows=shared_rows(1000, 100), base_url=simulator.url,
                             call={"concurrency": 16})
    assert pipeline.run() == 0
    assert simulator.stats.requests == 100
    results = pipeline.export(capsys)
    assert len(results) == 1000 and {r["status"] for r in results} == {"done"}
    for result in results:
        number = int(result["id"][1:]) % 100
        assert result["output"].endswith(f"You asked: What is {number} squared?")
    assert pipeline.query("SELECT COUNT(*), SUM(bought) FROM outputs") == [(1000, 100)]
    assert pipeline.query("SELECT calls_made FROM runs") == [(100,)]
    costs = money(pipeline, capsys)
    assert costs["status"] > 0 and len(set(costs.values())) == 1, costs

    assert pipeline.run() == 0
    assert simulator.stats.requests == 100


@pytest.mark.slow
def test_identical_requests_are_paid_once_across_a_kill_9(make_pipeline: Any,
                                                           capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=40)) as server:
        pipeline = make_pipeline(rows=shared_rows(1000, 100), base_url=server.url,
                                 call={"concurrency": 8})
        kill_mid_run(pipeline, server, 40)
        assert pipeline.run() == 0
        results = pipeline.export(capsys)
        assert len(results) == 1000 and {r["status"] for r in results} == {"done"}
        # only replies lost in flight by the kill are bought twice; every stored one once
        assert server.stats.max_per_request <= 2
        assert server.stats.requests <= 100 + 8
        assert pipeline.query("SELECT COUNT(DISTINCT request_key), COUNT(*) FROM responses"
                              ) == [(100, 100)]
        assert pipeline.query("SELECT state FROM runs ORDER BY id") == [("crashed",),
                                                                         ("finished",)]
        costs = money(pipeline, capsys)
        assert len(set(costs.values())) == 1, costs


def test_editing_post_steps_reposts_without_calls_and_keeps_every_cost(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = questions(10)
    rows[3]["question"] = "[sim:finish=content_filter] a long story"
    (make_pipeline().folder / "cleaning.py").write_text(CLEAN)
    pipeline = make_pipeline(rows=rows, base_url=simulator.url, post=["strip"])
    assert pipeline.run() == 1
    before, costs = paid(pipeline), money(pipeline, capsys)
    status = pipeline.query("SELECT prompt_tokens, completion_tokens, cost_usd FROM runs")
    assert simulator.stats.requests == 10 and costs["status"] > 0

    for post in (["strip", "lower"], ["strip", {"regex": r"Simulated reply (\w+):"}],
                 [{"python": "cleaning:clean"}]):
        pipeline.config["post"] = post
        assert pipeline.run() == 1
        assert simulator.stats.requests == 10, post
        assert paid(pipeline) == before, post
        assert money(pipeline, capsys) == costs, post
        assert pipeline.query("SELECT calls_made, cost_usd FROM runs ORDER BY id DESC "
                              "LIMIT 1") == [(0, 0.0)]
    assert pipeline.query("SELECT prompt_tokens, completion_tokens, cost_usd FROM runs "
                          "ORDER BY id LIMIT 1") == status
    outputs = [r["output"] for r in pipeline.export(capsys) if r["status"] == "done"]
    assert all("SIMULATED" in o for o in outputs) and len(outputs) == 9


def test_a_reply_cut_short_is_kept_as_done_flagged_and_on_truncated_fail_fails_it_unpaid(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = questions(4)
    rows[1]["question"] = "[sim:finish=length] a long story"
    rows[2]["question"] = "[sim:finish=content_filter] something"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    capsys.readouterr()
    assert pipeline.run() == 1  # the filtered one fails
    assert "1 replies were cut short at max_tokens: kept as done" in capsys.readouterr().err
    assert pipeline.query("SELECT item_id, status, truncated, cost_usd > 0 FROM results "
                          "ORDER BY row") == [("q00000", "done", 0, 1), ("q00001", "done", 1, 1),
                                              ("q00002", "failed", 0, 1), ("q00003", "done", 0, 1)]
    assert pipeline.cli("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["truncated"] == 1
    assert pipeline.cli("show", "q00001") == 0
    assert json.loads(capsys.readouterr().out)["truncated"] is True
    assert [r["truncated"] for r in pipeline.export(capsys)] == [False, True, False, False]

    # a post step that cannot use a reply cut short says so
    pipeline.config["post"] = ["json"]
    assert pipeline.run() == 1
    error = pipeline.query("SELECT error FROM results WHERE item_id = 'q00001'")[0][0]
    assert error.startswith("the reply was cut short at max_tokens (finish_reason=length), and ")

    # today's behaviour on request: the stored reply fails its item, nothing is bought again
    pipeline.config["post"] = ["strip"]
    pipeline.config["call"]["on_truncated"] = "fail"
    assert pipeline.run() == 1
    assert pipeline.query("SELECT status, error_class, error FROM results "
                          "WHERE item_id = 'q00001'") == [
        ("failed", "ResponseError", "response cut short at max_tokens (finish_reason=length); "
                                    "raise max_tokens and run again (call.on_truncated)")]
    assert simulator.stats.requests == 4


def test_every_cost_figure_agrees_after_a_kill_a_post_edit_and_a_template_edit(
        make_pipeline: Any, capsys: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=30)) as server:
        pipeline = make_pipeline(rows=shared_rows(300, 150), base_url=server.url,
                                 call={"concurrency": 8})
        kill_mid_run(pipeline, server, 30)
        assert pipeline.run() == 0
        pipeline.config["post"] = ["strip", "lower"]
        assert pipeline.run() == 0
        pipeline.config["call"]["messages"][0]["content"] = "Answer in one word."
        rows = shared_rows(300, 150)
        write_rows(pipeline.folder / "rows.jsonl", rows[:200])
        assert pipeline.run() == 0
        costs = money(pipeline, capsys)
        assert costs["status"] == costs["runs"] == costs["responses"], costs
        assert costs["results"] == costs["status_results"] < costs["status"], costs
        capsys.readouterr()
        assert pipeline.cli("status") == 0
        assert "paid for requests no item makes any more" in " ".join(capsys.readouterr().out.split())

        # the budget cap reads the same sum: a cap at what was spent starts nothing (the sum
        # itself, not rounded: rounded up, it would leave room for one more call)
        ((origin,),) = pipeline.query("SELECT DISTINCT origin FROM responses")
        ((spent,),) = pipeline.query("SELECT COALESCE(SUM(cost_usd), 0) FROM responses "
                                     "WHERE origin=?", (origin,))
        pipeline.config["call"]["max_cost_usd"] = spent
        pipeline.config["call"]["messages"][0]["content"] = "Answer in two words."
        sent = server.stats.requests
        assert pipeline.run() == 1
        assert server.stats.requests == sent
        assert f"${costs['status']:.4f} of" in capsys.readouterr().err


def test_a_killed_run_records_what_it_paid_for(make_pipeline: Any) -> None:
    with SimulatorThread(SimulatorConfig(latency_ms=30)) as server:
        pipeline = make_pipeline(rows=questions(400), base_url=server.url,
                                 call={"concurrency": 8})
        kill_mid_run(pipeline, server, 40)
        with sqlite3.connect(pipeline.store) as db:
            stored = db.execute("SELECT COUNT(*), SUM(cost_usd) FROM responses").fetchone()
        assert pipeline.run("--limit", "1") == 0
        crashed = pipeline.query("SELECT state, calls_made, cost_usd FROM runs WHERE id = 1")
        assert crashed == [("crashed", stored[0], pytest.approx(stored[1]))]


def test_a_shared_reply_keeps_one_payer_when_its_buyer_leaves_or_moves(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(rows=shared_rows(6, 2), base_url=simulator.url)
    assert pipeline.run() == 0
    assert pipeline.query("SELECT COUNT(*) FROM outputs WHERE response_id IS NULL") == [(0,)]
    assert pipeline.query("SELECT COUNT(DISTINCT response_id), SUM(bought) FROM outputs"
                          ) == [(2, 2)]
    costs = money(pipeline, capsys)
    assert len(set(costs.values())) == 1, costs

    write_rows(pipeline.folder / "rows.jsonl", shared_rows(6, 2)[2:])  # the buyers leave
    assert pipeline.run() == 0
    assert money(pipeline, capsys) == costs

    messages = pipeline.config["call"]["messages"]
    messages[0]["content"] = "Answer in one word."
    assert pipeline.run() == 0
    messages[0]["content"] = "Answer briefly."  # back: the first replies serve again
    assert pipeline.run() == 0
    assert simulator.stats.requests == 4
    after = money(pipeline, capsys)
    assert after["status"] == after["runs"] == after["responses"] > costs["status"]
    assert after["results"] == after["status_results"] == costs["status"], after


def test_a_post_step_returning_what_json_cannot_hold_fails_only_its_item(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    (make_pipeline().folder / "sets.py").write_text(
        "import datetime\n\n"
        "def to_set(value):\n"
        "    if '1 plus' in value:\n        return datetime.datetime(2024, 1, 1)\n"
        "    if '2 plus' in value:\n"
        "        deep = []\n        for _ in range(100_000):\n            deep = [deep]\n"
        "        return deep\n"
        "    return {value} if '3 plus' in value else value\n")
    pipeline = make_pipeline(rows=questions(5), base_url=simulator.url,
                             post=[{"python": "sets:to_set"}])
    assert pipeline.run() == 1
    results = {r["id"]: r for r in pipeline.export(capsys)}
    for item, kind in (("q00001", "datetime"), ("q00002", "list"), ("q00003", "set")):
        assert results[item]["error_class"] == "PostError"
        assert f"returned a {kind} that is not JSON" in results[item]["error"]
    assert sum(r["status"] == "done" for r in results.values()) == 2
    assert pipeline.query("SELECT COUNT(*) FROM responses") == [(5,)]
    assert pipeline.run() == 1
    assert simulator.stats.requests == 5


def test_items_that_shared_a_reply_and_now_differ_each_pay_for_their_own(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = [{"id": "a", "question": "Same?", "topic": "x"},
            {"id": "b", "question": "Same?", "topic": "y"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url, call={"concurrency": 1})
    assert pipeline.run() == 0
    pipeline.config["call"]["messages"][1]["content"] = "{{ question }} ({{ topic }})"
    assert pipeline.run() == 0
    assert pipeline.run() == 0
    assert simulator.stats.requests == 3
    assert pipeline.query("SELECT SUM(bought) FROM outputs") == [(2,)]
    costs = money(pipeline, capsys)
    assert costs["status"] == costs["runs"] == costs["responses"], costs
    assert costs["results"] == costs["status_results"] < costs["status"], costs


def test_a_partial_run_after_a_template_edit_keeps_every_reply_paid_for(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(rows=shared_rows(20, 10), base_url=simulator.url)
    assert pipeline.run() == 0
    before = money(pipeline, capsys)
    pipeline.config["call"]["messages"][0]["content"] = "Answer in one word."
    assert pipeline.run("--limit", "1") == 0
    costs = money(pipeline, capsys)
    # the items not yet called show as pending; the replies they used are no one's now
    assert costs["status"] == costs["runs"] == costs["responses"] > before["status"]
    assert costs["results"] == costs["status_results"] < costs["status"]
    pipeline.config["call"]["messages"][0]["content"] = "Answer briefly."
    assert pipeline.run() == 0
    assert money(pipeline, capsys)["results"] == before["status"]


def test_every_paid_reply_is_counted_even_when_it_had_to_be_retried(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    rows = questions(3)
    rows[1]["question"] = "[sim:finish=none*2] no finish reason twice"
    rows[2]["question"] = "[sim:finish=none] never a finish reason"
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"retry": {"max_tries": 3}})
    assert pipeline.run() == 1
    assert simulator.stats.requests == 1 + 3 + 3
    ((tokens,),) = pipeline.query("SELECT SUM(prompt_tokens + completion_tokens) FROM responses")
    assert tokens == simulator.stats.tokens
    results = {r["id"]: r for r in pipeline.export(capsys)}
    assert results["q00001"]["status"] == "done"
    assert "gave up after 3 attempts" in results["q00002"]["error"]
    costs = money(pipeline, capsys)
    assert len(set(costs.values())) == 1, costs
    assert pipeline.run() == 1  # paid for, failed: kept, not bought again
    assert simulator.stats.requests == 7


def test_items_that_all_fail_the_same_way_stop_the_run(make_pipeline: Any, simulator:
                                                       SimulatorThread, capsys: Any) -> None:
    rows = [{"id": f"r{i}", "question": f"[sim:status=400] q{i}"} for i in range(40)]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"concurrency": 1, "stop_after_failures": 5})
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "the last 5 items all failed the same way" in err
    assert "BadRequestError: 400: Simulated error 400." in err
    assert simulator.stats.requests <= 6
    assert pipeline.query("SELECT state FROM runs") == [("stopped",)]
    # a template typo fails at planning, before anything is sent
    pipeline.config["call"]["messages"] = [{"role": "user", "content": "{{ questoin }}"}]
    sent = simulator.stats.requests
    assert pipeline.run() == 2
    assert "missing template field 'questoin'" in capsys.readouterr().err
    assert simulator.stats.requests == sent


def test_failures_mixed_with_successes_never_stop_the_run(make_pipeline: Any, simulator:
                                                          SimulatorThread, capsys: Any) -> None:
    rows = [{"id": f"r{i}", "question": f"{'[sim:status=400] ' * (i % 2)}q{i}"}
            for i in range(30)]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url,
                             call={"concurrency": 1, "stop_after_failures": 3})
    assert pipeline.run() == 1
    assert simulator.stats.requests == 30


def test_a_budget_on_a_model_without_a_price_is_a_config_error(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url,
                             call={"model": "my-local-llama", "max_cost_usd": 1.0})
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "call.max_cost_usd: flow does not know the price of model 'my-local-llama'" in err
    assert "add call.price" in err and simulator.stats.requests == 0
    pipeline.config["call"]["price"] = {"input_per_1m": 1, "output_per_1m": 2}
    assert pipeline.run() == 0


def test_one_server_written_two_ways_is_one_endpoint_and_endpoint_id_follows_a_move(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20
    pipeline.config["call"]["base_url"] = simulator.url.replace("127.0.0.1", "localhost") + "/"
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20
    # a server that moves keeps its results under the name the pipeline gives it
    pipeline.config["call"]["endpoint_id"] = "team-vllm"
    assert pipeline.run() == 0
    assert simulator.stats.requests == 40
    with SimulatorThread(SimulatorConfig(seed=7)) as moved:
        pipeline.config["call"]["base_url"] = moved.url
        assert pipeline.run() == 0
        assert moved.stats.requests == 0


def test_an_origin_stored_before_origins_were_normal_is_still_the_same_endpoint() -> None:
    from flow.endpoints import endpoint_origin, same_origin
    origin = endpoint_origin("HTTP://LocalHost:8000//v1/", False)
    assert origin == "http://localhost:8000/v1"
    assert endpoint_origin("https://api.openai.com:443/v1", False) == "https://api.openai.com/v1"
    assert endpoint_origin(None, True, endpoint_id="team-vllm") == "simulator"
    known = ["simulator", "http://127.0.0.1:8000/v1"]
    assert same_origin(origin, known) == "http://127.0.0.1:8000/v1"
    assert same_origin("http://localhost:9000/v1", known) == "http://localhost:9000/v1"
