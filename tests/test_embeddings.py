"""`call.endpoint: embeddings`: items packed into requests, vectors stored as bytes, exported;
end to end through the CLI and the `openai` SDK against the simulator."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from pathlib import Path
from typing import Any

import openai
import pyarrow.parquet as pq
import pytest
from conftest import kill_mid_run

from flow.cli import main
from flow.config import load_config
from flow.plan import RunOptions
from flow.run import run_pipeline
from flow.simulator import SimulatorConfig, SimulatorThread

EMBED = {"endpoint": "embeddings", "model": "text-embedding-3-small", "input": "{{ text }}",
         "params": {}, "inputs_per_request": 10}


def _rows(count: int, distinct: int | None = None) -> list[dict[str, Any]]:
    return [{"id": f"e{i:05d}", "text": f"short text number {i % (distinct or count)}"}
            for i in range(count)]


def _pipeline(make_pipeline: Any, simulator: SimulatorThread | None,
              rows: list[dict[str, Any]], post: list[str] | None = None, **call: Any) -> Any:
    pipeline = make_pipeline(rows=rows, base_url=simulator.url if simulator else None,
                             post=post or [], call={**EMBED, **call})
    if "messages" not in call:
        del pipeline.config["call"]["messages"]  # an embeddings stage has `input` instead
    return pipeline


def test_the_simulator_answers_the_sdk_as_openai_does(simulator: SimulatorThread) -> None:
    client = openai.OpenAI(base_url=simulator.url, api_key="sk-test", max_retries=0)
    small = client.embeddings.create(model="text-embedding-3-small", input=["a cat", "a dog"])
    assert [len(e.embedding) for e in small.data] == [1536, 1536]
    assert small.usage.prompt_tokens == 4
    short = client.embeddings.create(model="text-embedding-3-large", input="a cat",
                                     dimensions=256, encoding_format="float")
    large = client.embeddings.create(model="text-embedding-3-large", input="a cat")
    assert len(large.data[0].embedding) == 3072
    scale = math.sqrt(3072 / 256)  # the start of the full vector, at unit length again
    assert short.data[0].embedding == pytest.approx(
        [value * scale for value in large.data[0].embedding[:256]], rel=1e-5)
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        client.embeddings.create(model="text-embedding-ada-002", input="x", dimensions=8)


def test_items_are_packed_and_each_gets_its_vector(make_pipeline: Any,
                                                   simulator: SimulatorThread) -> None:
    pipeline = _pipeline(make_pipeline, simulator, _rows(95))
    assert pipeline.run() == 0
    assert simulator.stats.requests == 10  # ceil(95 / 10)
    assert simulator.stats.embedded_inputs == 95
    (request,), = pipeline.query("SELECT request FROM responses LIMIT 1")
    assert json.loads(request) == {"input": "short text number 0",
                                   "model": "text-embedding-3-small"}
    done = pipeline.query("SELECT COUNT(*), MIN(dimensions), MAX(length(vector)) FROM results "
                          "JOIN vectors ON vectors.response_id = results.response_id "
                          "WHERE status = 'done'")
    assert done == [(95, 1536, 1536 * 4)]
    vector = pipeline.query("SELECT vector FROM vectors LIMIT 1")[0][0]
    norm = math.sqrt(sum(v * v for v in struct.unpack("<1536f", vector)))
    assert 0.9 < norm < 1.1


def test_a_dry_run_counts_the_requests_items_pack_into(make_pipeline: Any,
                                                      simulator: SimulatorThread,
                                                      capsys: Any) -> None:
    pipeline = _pipeline(make_pipeline, simulator, _rows(95, distinct=45))
    assert pipeline.run("--dry-run") == 0
    out = capsys.readouterr().out
    assert "45 to call (50 more items share those requests), packed into 5 requests" in out
    assert "up to 0 completion tokens" in out and simulator.stats.requests == 0


def test_identical_texts_are_paid_once_and_costs_agree(make_pipeline: Any,
                                                       simulator: SimulatorThread,
                                                       capsys: Any) -> None:
    pipeline = _pipeline(make_pipeline, simulator, _rows(60, distinct=25))
    assert pipeline.run() == 0
    assert simulator.stats.embedded_inputs == 25
    assert simulator.stats.requests == 3
    (replies, tokens, paid), = pipeline.query(
        "SELECT COUNT(*), SUM(prompt_tokens), SUM(cost_usd) FROM responses")
    assert replies == 25 and tokens == simulator.stats.tokens  # shares add up to each request
    (items, item_tokens, item_cost), = pipeline.query(
        "SELECT COUNT(*), SUM(prompt_tokens), SUM(cost_usd) FROM results WHERE status = 'done'")
    assert items == 60 and item_tokens == tokens
    assert item_cost == pytest.approx(paid) and paid == pytest.approx(tokens * 0.02 / 1e6)
    (run_cost,), = pipeline.query("SELECT cost_usd FROM runs")
    assert run_cost == pytest.approx(paid)
    exported = pipeline.export(capsys)
    assert len(exported) == 60 and all(len(row["embedding"]) == 1536 for row in exported)
    same = [row["embedding"] for row in exported if row["text"] == "short text number 3"]
    assert len(same) == 3 and same[0] == same[1] == same[2]


def test_a_killed_run_resumes_calling_only_what_is_missing(make_pipeline: Any,
                                                           simulator: SimulatorThread) -> None:
    simulator.config.latency_ms = 40
    pipeline = _pipeline(make_pipeline, simulator, _rows(120), concurrency=1)
    kill_mid_run(pipeline, simulator, after_requests=3)
    (stored,), = pipeline.query("SELECT COUNT(*) FROM vectors")
    assert 0 < stored < 120
    before = simulator.stats.embedded_inputs
    simulator.config.latency_ms = 0
    assert pipeline.run() == 0
    assert simulator.stats.embedded_inputs - before == 120 - stored
    (vectors, done), = pipeline.query("SELECT (SELECT COUNT(*) FROM vectors), "
                                      "(SELECT COUNT(*) FROM results WHERE status = 'done')")
    assert vectors == done == 120


def test_a_refused_request_is_split_so_the_bad_input_fails_alone(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    rows = _rows(10)
    rows[6]["text"] = "this one is refused [sim:status=400]"
    pipeline = _pipeline(make_pipeline, simulator, rows)
    assert pipeline.run() == 1  # an item failed
    results = dict(pipeline.query("SELECT item_id, COALESCE(error_class, status) FROM results"))
    assert results.pop("e00006") == "BadRequestError"
    assert set(results.values()) == {"done"}
    assert 1 < simulator.stats.requests <= 1 + 2 * math.ceil(math.log2(10))


def test_a_refusal_of_the_request_itself_fails_its_items_at_once_unsplit(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    # a model flow does not know, asked for more dimensions than it has: the server names
    # `dimensions`, not an input, and every half would be refused the same
    pipeline = _pipeline(make_pipeline, simulator, _rows(40), model="house-embedder",
                         params={"dimensions": 4096}, stop_after_failures=0)
    assert pipeline.run() == 1
    failed = pipeline.query("SELECT error_class, error FROM results WHERE status = 'failed'")
    assert len(failed) == 40
    assert {c for c, _ in failed} == {"BadRequestError"}
    assert all("'dimensions' must be an integer from 1 to 1536" in e for _, e in failed)
    assert simulator.stats.requests == 4  # one a pack of 10, where halving sent 76


def test_an_input_too_long_or_empty_fails_alone_unsent(make_pipeline: Any,
                                                       simulator: SimulatorThread) -> None:
    rows = _rows(6)
    rows[2]["text"] = "word " * 9000
    rows[4]["text"] = ""
    pipeline = _pipeline(make_pipeline, simulator, rows)
    assert pipeline.run() == 1  # items failed
    failed = pipeline.query("SELECT error_class, error FROM results WHERE status = 'failed' "
                            "ORDER BY item_id")
    assert [error_class for error_class, _ in failed] == ["InputTooLongError",
                                                          "InputEmptyError"]
    assert "8,192" in failed[0][1]
    assert simulator.stats.embedded_inputs == 4 and simulator.stats.requests == 1


def test_a_text_embedded_before_is_not_sent_again(make_pipeline: Any,
                                                  simulator: SimulatorThread,
                                                  capsys: Any) -> None:
    pipeline = _pipeline(make_pipeline, simulator, _rows(10))
    assert pipeline.run() == 0
    more = _rows(10) + [{"id": "again", "text": "short text number 4"}]
    pipeline = _pipeline(make_pipeline, simulator, more)
    assert pipeline.run() == 0
    assert simulator.stats.embedded_inputs == 10
    exported = {row["id"]: row["embedding"] for row in pipeline.export(capsys)}
    assert exported["again"] == exported["e00004"] and len(exported["again"]) == 1536


def test_dimensions_are_honoured_and_parquet_reads_back(make_pipeline: Any,
                                                        simulator: SimulatorThread) -> None:
    pipeline = _pipeline(make_pipeline, simulator, _rows(30), params={"dimensions": 256})
    assert pipeline.run() == 0
    out = pipeline.folder / "vectors.parquet"
    assert pipeline.cli("export", "-o", str(out)) == 0
    table = pq.read_table(out)
    assert table.num_rows == 30
    column = table.column("embedding").combine_chunks()
    assert column.type.list_size == 256 and len(column.flatten()) == 30 * 256
    (stored,), = pipeline.query("SELECT vector FROM vectors JOIN responses "
                                "ON responses.id = vectors.response_id WHERE request "
                                "LIKE '%number 0\"%'")
    first = column[table.column("id").to_pylist().index("e00000")].values.to_pylist()
    assert first == list(struct.unpack("<256f", stored))


def test_show_gives_dimensions_and_first_numbers(make_pipeline: Any,
                                                 simulator: SimulatorThread,
                                                 capsys: Any) -> None:
    pipeline = _pipeline(make_pipeline, simulator, _rows(3))
    assert pipeline.run() == 0
    capsys.readouterr()
    assert pipeline.cli("show", "e00001") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["embedding"]["dimensions"] == 1536 and len(shown["embedding"]["first_8"]) == 8
    assert shown["response"]["packed"]["inputs"] == 3
    assert pipeline.cli("status") == 0


def test_the_store_stays_under_four_times_the_raw_vectors(make_pipeline: Any,
                                                          simulator: SimulatorThread) -> None:
    count = 1000  # the overhead is per item: a thousand show the ratio a million would
    pipeline = _pipeline(make_pipeline, simulator, _rows(count), inputs_per_request=100)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 10
    size = sum(path.stat().st_size for path in pipeline.folder.glob("flow.db*"))
    raw = count * 1536 * 4
    assert size < 4 * raw


def test_embeddings_through_the_batch_api_match_online(make_pipeline: Any,
                                                       capsys: Any) -> None:
    fast = {"first_poll_s": 0.01, "max_poll_s": 0.05, "gather_s": 0.3, "create_grace_s": 0,
            "max_requests_per_batch": 20}
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=0.2)) as server:
        batched = _pipeline(make_pipeline, server, _rows(30), executor="batch", batch=fast)
        batched.config["store"] = "batch.db"
        assert batched.run() == 0
        assert sorted(server.stats.batch_creates.values()) == [1, 1]
        assert server.stats.requests == 0 and server.stats.embedded_inputs == 30
        (count, tokens, cost, batches), = batched.query(
            "SELECT COUNT(*), SUM(prompt_tokens), SUM(cost_usd), COUNT(DISTINCT batch_id) "
            "FROM responses JOIN vectors ON vectors.response_id = responses.id")
        assert count == 30 and batches == 2
        assert cost == pytest.approx(tokens * 0.01 / 1e6)  # half the online price
        through_batches = batched.export(capsys)
        online = _pipeline(make_pipeline, server, _rows(30))
        assert online.run() == 0
        assert online.export(capsys) == through_batches


@pytest.mark.parametrize(("call", "post", "fix"), [
    ({}, ["strip"], "post: post steps work on text"),
    ({"schema": {"type": "object"}}, [], "schema: an embeddings stage makes a vector"),
    ({"messages": [{"role": "user", "content": "x"}]}, [], "remove messages:"),
    ({"input": None}, [], "input: required key is missing"),
    ({"params": {"encoding_format": "float"}}, [], "params.encoding_format"),
    ({"inputs_per_request": 5000}, [], "inputs_per_request"),
    ({"params": {"dimensions": 4000}}, [], "dimensions: expected a whole number of 1 or more "
                                           "up to 1,536"),
    ({"model": "text-embedding-ada-002", "params": {"dimensions": 256}}, [],
     "takes no dimensions param"),
])
def test_config_errors_name_the_key_and_the_fix(make_pipeline: Any, capsys: Any,
                                                call: dict[str, Any], post: list[str],
                                                fix: str) -> None:
    pipeline = _pipeline(make_pipeline, None, _rows(2), post=post, **call)
    if call.get("input", "") is None:
        del pipeline.config["call"]["input"]
    assert pipeline.run() == 2
    error = capsys.readouterr().err
    assert str(pipeline.file.name) in error and fix in error


def test_a_later_stage_cannot_read_an_embeddings_stage(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "text": "x"}\n')
    embed = {**EMBED, "name": "vec"}
    later = {"name": "ask", "model": "gpt-4o-mini",
             "messages": [{"role": "user", "content": "{{ vec.output }}"}]}
    file = tmp_path / "pipeline.yaml"
    file.write_text(json.dumps({"store": "flow.db", "load": {"path": "rows.jsonl"},
                                "stages": [embed, later]}))
    assert main(["run", str(file), "--simulate"]) == 2
    assert "stages[1].messages[0].content: reads 'vec', an embeddings stage" in \
        capsys.readouterr().err



def test_a_pack_goes_when_the_budget_waits_for_the_calls_in_it(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    # near max_cost_usd the budget waits for the calls in flight to settle before more
    # go; the calls gathered into a pack count as in flight, so the pack must go (the run
    # waited for good, nothing sent)
    price = {"input_per_1m": 1000, "output_per_1m": 0}  # each input guessed at $0.015
    pipeline = _pipeline(make_pipeline, simulator, _rows(40), concurrency=1,
                         max_cost_usd=0.05, price=price)
    config = load_config(pipeline.write())
    summary = asyncio.run(asyncio.wait_for(run_pipeline(config, RunOptions()), 60))
    assert summary.state == "stopped" and "max_cost_usd" in (summary.message or "")
    ((spent, replies),) = pipeline.query("SELECT SUM(cost_usd), COUNT(*) FROM responses")
    assert spent >= 0.05 and 4 < replies < 40
