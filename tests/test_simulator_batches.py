"""The simulator's Batch API answers the real SDK as OpenAI does, on a clock tests move."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types import Batch

from flow.simulator import SimulatorConfig, SimulatorThread
from flow.simulator.options import add_simulator_options, simulator_config

ENDPOINT = "/v1/chat/completions"


def request_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    """A line of a batch input file: one chat completion request."""
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"model": "gpt-4o-mini",
                     "messages": [{"role": "user", "content": content}], **body}}


def jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines).encode()


@pytest.fixture
def server() -> Iterator[SimulatorThread]:
    """A simulator whose batches take 10 simulated seconds."""
    with SimulatorThread(SimulatorConfig(seed=7, batch_s=10)) as thread:
        yield thread


@pytest.fixture
async def client(server: SimulatorThread) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.url, api_key="sk-test",
                                  max_retries=0) as sdk:
        yield sdk


async def submit(client: openai.AsyncOpenAI, lines: list[Any], **metadata: str) -> Batch:
    """Upload `lines` and create a batch of them."""
    uploaded = await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                       completion_window="24h", metadata=metadata or None)


async def read_jsonl(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


def questions(count: int) -> list[dict[str, Any]]:
    return [request_line(f"q{i}", f"What is {i} plus {i}?") for i in range(count)]


async def test_a_batch_runs_over_batch_s_and_its_output_matches_chat_completions(
        server: SimulatorThread, client: openai.AsyncOpenAI) -> None:
    lines = questions(20) + [request_line("json", "Reply as JSON", max_tokens=30,
                                          response_format={"type": "json_object"})]
    batch = await submit(client, lines)
    assert batch.id.startswith("batch_") and batch.status == "validating"
    assert batch.input_file_id.startswith("file-") and batch.endpoint == ENDPOINT
    assert batch.expires_at == batch.created_at + 24 * 3600
    uploaded = await client.files.retrieve(batch.input_file_id)
    assert (uploaded.purpose, uploaded.status, uploaded.filename) == (
        "batch", "processed", "input.jsonl")
    assert uploaded.bytes == len(jsonl(lines))

    server.advance(5)
    half = await client.batches.retrieve(batch.id)
    assert half.status == "in_progress" and half.output_file_id is None
    assert half.request_counts is not None and half.request_counts.total == 21
    assert 0 < half.request_counts.completed < 21

    server.advance(5)
    done = await client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert done.request_counts is not None and done.request_counts.completed == 21
    assert done.completed_at is not None and done.completed_at >= done.created_at + 10
    output = await read_jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(
        line["custom_id"] for line in lines)
    by_id = {line["custom_id"]: line for line in output}
    for sent in lines:
        result = by_id[sent["custom_id"]]
        assert result["id"].startswith("batch_req_") and result["error"] is None
        assert result["response"]["status_code"] == 200
        assert result["response"]["request_id"].startswith("req_")
        online = httpx2.post(server.url + "/chat/completions", json=sent["body"], timeout=10)
        assert {**result["response"]["body"], "created": 0} == {**online.json(), "created": 0}
    assert done.usage is not None and done.usage.total_tokens == sum(
        line["response"]["body"]["usage"]["total_tokens"] for line in output)
    assert server.stats.batch_lines == 21 and server.stats.files_uploaded == 1


async def test_output_is_shuffled_by_default_and_in_input_order_when_asked(
        client: openai.AsyncOpenAI, server: SimulatorThread) -> None:
    batch = await submit(client, questions(30))
    server.advance(10)
    done = await client.batches.retrieve(batch.id)
    shuffled = [line["custom_id"] for line in await read_jsonl(client, done.output_file_id)]
    assert shuffled != [f"q{i}" for i in range(30)] and len(shuffled) == 30

    with SimulatorThread(SimulatorConfig(seed=7, batch_s=10, batch_shuffle=False)) as ordered:
        async with openai.AsyncOpenAI(base_url=ordered.url, api_key="sk-test",
                                      max_retries=0) as sdk:
            batch = await submit(sdk, questions(30))
            ordered.advance(10)
            done = await sdk.batches.retrieve(batch.id)
            in_order = [line["custom_id"] for line in await read_jsonl(sdk, done.output_file_id)]
    assert in_order == [f"q{i}" for i in range(30)]


async def test_a_line_with_a_fault_marker_fails_in_the_error_file(
        client: openai.AsyncOpenAI, server: SimulatorThread) -> None:
    lines = [*questions(3), request_line("bad", "[sim:status=400] no"),
             request_line("flaky", "[sim:status=500*1] once"),
             request_line("cut", "[sim:finish=length] short")]
    batch = await submit(client, lines)
    server.advance(10)
    done = await client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 2)
    errors = {line["custom_id"]: line for line in await read_jsonl(client, done.error_file_id)}
    assert set(errors) == {"bad", "flaky"}
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["message"] == "Simulated error 400."
    assert errors["flaky"]["response"]["status_code"] == 500 and errors["flaky"]["error"] is None
    output = {line["custom_id"]: line for line in await read_jsonl(client, done.output_file_id)}
    assert output["cut"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    # the marker's count is shared with chat completions: the second arrival passes
    again = httpx2.post(server.url + "/chat/completions", json=lines[4]["body"], timeout=10)
    assert again.status_code == 200


async def test_expire_fault_keeps_the_lines_done_and_lists_the_rest_as_batch_expired() -> None:
    config = SimulatorConfig(seed=1, batch_s=10, batch_faults={1: "expire:6"})
    with SimulatorThread(config) as server:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as sdk:
            batch = await submit(sdk, questions(10))
            server.advance(9.9)
            running = await sdk.batches.retrieve(batch.id)
            assert running.status == "in_progress"
            assert running.request_counts is not None and running.request_counts.completed == 6
            server.advance(0.1)
            expired = await sdk.batches.retrieve(batch.id)
            assert expired.status == "expired" and expired.expired_at is not None
            done = await read_jsonl(sdk, expired.output_file_id)
            undone = await read_jsonl(sdk, expired.error_file_id)
    assert len(done) == 6 and len(undone) == 4
    assert {line["custom_id"] for line in done + undone} == {f"q{i}" for i in range(10)}
    assert all(line["response"] is None and line["error"]["code"] == "batch_expired"
               for line in undone)


async def test_a_batch_not_done_within_24_hours_expires(server: SimulatorThread) -> None:
    server.config.batch_s = 48 * 3600
    async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as sdk:
        batch = await submit(sdk, questions(4))
        server.advance(24 * 3600)
        expired = await sdk.batches.retrieve(batch.id)
    assert expired.status == "expired" and expired.expired_at == batch.expires_at
    assert expired.request_counts is not None and expired.request_counts.completed == 2


async def test_cancel_fault_cancels_with_partial_output() -> None:
    config = SimulatorConfig(seed=1, batch_s=10, batch_faults={2: "cancel:3"})
    with SimulatorThread(config) as server:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as sdk:
            untouched = await submit(sdk, questions(10))
            batch = await submit(sdk, questions(10))
            server.advance(10)
            cancelled = await sdk.batches.retrieve(batch.id)
            assert (await sdk.batches.retrieve(untouched.id)).status == "completed"
            done = await read_jsonl(sdk, cancelled.output_file_id)
            undone = await read_jsonl(sdk, cancelled.error_file_id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert len(done) == 3 and len(undone) == 7
    assert {line["error"]["code"] for line in undone} == {"batch_cancelled"}


async def test_cancel_of_a_running_batch_keeps_the_lines_done_so_far(
        client: openai.AsyncOpenAI, server: SimulatorThread) -> None:
    batch = await submit(client, questions(10))
    server.advance(4.5)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    server.advance(1)
    cancelled = await client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled"
    assert cancelled.request_counts is not None and cancelled.request_counts.completed == 4
    assert len(await read_jsonl(client, cancelled.output_file_id)) == 4
    assert len(await read_jsonl(client, cancelled.error_file_id)) == 6
    assert (await client.batches.cancel(batch.id)).status == "cancelled"
    server.advance(10)
    finished = await submit(client, questions(1))
    server.advance(10)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status"):
        await client.batches.cancel(finished.id)


async def test_fail_validation_fault_fails_the_batch_with_a_line_number() -> None:
    config = SimulatorConfig(seed=1, batch_faults={1: "fail-validation:3"})
    with SimulatorThread(config) as server:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as sdk:
            batch = await submit(sdk, questions(5))
            failed = await sdk.batches.retrieve(batch.id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.errors is not None and failed.errors.data is not None
    assert failed.errors.object == "list"
    assert [(e.line, bool(e.message)) for e in failed.errors.data] == [(3, True)]


async def test_invalid_lines_fail_validation_with_their_line_numbers(
        client: openai.AsyncOpenAI) -> None:
    lines: list[Any] = [
        request_line("a", "fine"),
        "this is not JSON",
        {"custom_id": "c", "method": "POST", "url": ENDPOINT},
        request_line("a", "the same custom_id"),
        {**request_line("e", "x"), "url": "/v1/embeddings"},
    ]
    batch = await submit(client, lines)
    failed = await client.batches.retrieve(batch.id)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (2, "invalid_json_line"), (3, "missing_required_parameter"),
        (4, "duplicate_custom_id"), (5, "invalid_url")]
    assert failed.errors.data[1].param == "body"
    assert failed.request_counts is not None and failed.request_counts.total == 0


async def test_token_limit_fault_and_enqueued_token_limit_fail_with_token_limit_exceeded(
        server: SimulatorThread, client: openai.AsyncOpenAI) -> None:
    server.config.batch_faults = {1: "token-limit"}
    faulted = await client.batches.retrieve((await submit(client, questions(2))).id)
    assert faulted.status == "failed"
    assert faulted.errors is not None and faulted.errors.data is not None
    assert faulted.errors.data[0].code == "token_limit_exceeded"

    server.config.batch_token_limit = 150  # a line: 14 prompt tokens and max_tokens 20
    lines = [request_line(f"q{i}", f"What is {i} plus {i}?", max_tokens=20) for i in range(4)]
    first = await submit(client, lines)
    over = await submit(client, [request_line("x", "What is 9 plus 9?", max_tokens=20)])
    assert (await client.batches.retrieve(first.id)).status == "in_progress"
    refused = await client.batches.retrieve(over.id)
    assert refused.status == "failed" and refused.errors is not None
    assert refused.errors.data is not None
    assert refused.errors.data[0].code == "token_limit_exceeded"
    server.advance(10)  # the first batch finishes: its tokens are no longer enqueued
    again = await submit(client, [request_line("x", "What is 9 plus 9?", max_tokens=20)])
    assert (await client.batches.retrieve(again.id)).status == "in_progress"


async def test_a_dropped_create_still_makes_one_batch_that_list_shows() -> None:
    config = SimulatorConfig(seed=1, batch_s=10, batch_faults={1: "drop-create"})
    with SimulatorThread(config) as server:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as sdk:
            uploaded = await sdk.files.create(file=("in.jsonl", jsonl(questions(3))),
                                              purpose="batch")
            with pytest.raises(openai.APIConnectionError):
                await sdk.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                         completion_window="24h", metadata={"shard": "s1"})
            listed = [batch async for batch in sdk.batches.list()]
            assert len(listed) == 1 and listed[0].metadata == {"shard": "s1"}
            assert listed[0].input_file_id == uploaded.id
            server.advance(10)
            assert (await sdk.batches.retrieve(listed[0].id)).status == "completed"
        assert server.stats.batch_creates == {"s1": 1}


async def test_list_pages_newest_first_with_metadata_and_stats_count_creates_per_shard(
        server: SimulatorThread, client: openai.AsyncOpenAI) -> None:
    created = [await submit(client, questions(1), shard=f"s{i % 3}", store="flow.db")
               for i in range(5)]
    page = await client.batches.list(limit=2)
    assert [b.id for b in page.data] == [created[4].id, created[3].id] and page.has_more
    everything = [batch async for batch in client.batches.list(limit=2)]
    assert [b.id for b in everything] == [b.id for b in reversed(created)]
    assert everything[0].metadata == {"shard": "s1", "store": "flow.db"}
    after = await client.batches.list(limit=10, after=created[2].id)
    assert [b.id for b in after.data] == [created[1].id, created[0].id] and not after.has_more
    assert server.stats.batch_creates == {"s0": 2, "s1": 2, "s2": 1}
    unsharded = await submit(client, questions(1))
    assert server.stats.batch_creates[unsharded.input_file_id] == 1
    stats = httpx2.get(server.url.removesuffix("/v1") + "/sim/stats", timeout=10).json()
    assert stats["batch_creates"]["s0"] == 2 and stats["files_uploaded"] == 6


async def test_sim_advance_moves_the_clock_over_http(
        server: SimulatorThread, client: openai.AsyncOpenAI) -> None:
    batch = await submit(client, questions(2))
    answer = httpx2.post(server.url.removesuffix("/v1") + "/sim/advance",
                         json={"seconds": 10}, timeout=10)
    assert answer.status_code == 200
    assert (await client.batches.retrieve(batch.id)).status == "completed"
    bad = httpx2.post(server.url.removesuffix("/v1") + "/sim/advance",
                      json={"seconds": -1}, timeout=10)
    assert bad.status_code == 400


async def test_unknown_ids_and_bad_creates_are_refused_as_openai_refuses_them(
        client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        await client.files.content("file-missing")
    with pytest.raises(openai.BadRequestError, match="input_file_id"):
        await client.batches.create(input_file_id="file-missing", endpoint=ENDPOINT,
                                    completion_window="24h")
    uploaded = await client.files.create(file=("in.jsonl", jsonl(questions(1))),
                                         purpose="batch")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                    completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="jsonl"):
        await client.files.create(file=("in.txt", b"{}\n"), purpose="batch")


async def test_files_and_batches_need_the_configured_key() -> None:
    with SimulatorThread(SimulatorConfig(api_key="sk-right")) as server:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="sk-wrong",
                                      max_retries=0) as sdk:
            with pytest.raises(openai.AuthenticationError):
                await sdk.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
            with pytest.raises(openai.AuthenticationError):
                await sdk.batches.list()


def test_batch_options_of_flow_simulate_map_to_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_simulator_options(parser, prefix="")
    args = parser.parse_args(["--batch-s", "30", "--batch-fault", "1=expire:60",
                              "--batch-fault", "3=drop-create", "--batch-token-limit", "900",
                              "--no-batch-shuffle"])
    config = simulator_config(args, "")
    assert (config.batch_s, config.batch_faults, config.batch_token_limit,
            config.batch_shuffle) == (30.0, {1: "expire:60", 3: "drop-create"}, 900, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-fault", "1=explode"])
