"""The simulator answers like OpenAI: replies, usage, limits, headers and faults."""

from __future__ import annotations

import json
from typing import Literal

import httpx2
import openai
import pytest
from pydantic import BaseModel, Field

from flow.simulator import SimulatorConfig, SimulatorThread, format_duration
from flow.simulator.limits import Limit


def post(url: str, content: str, **body: object) -> httpx2.Response:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}
    return httpx2.post(url + "/chat/completions", json=payload, timeout=10,
                       headers={"Authorization": "Bearer sk-x"})


def test_replies_are_deterministic_and_json_when_asked() -> None:
    with SimulatorThread() as server:
        first = post(server.url, "hello").json()
        again = post(server.url, "hello").json()
        assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"][
            "content"]
        assert "You asked: hello" in first["choices"][0]["message"]["content"]
        usage = first["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        as_json = post(server.url, "x", response_format={"type": "json_object"}).json()
        assert json.loads(as_json["choices"][0]["message"]["content"])["echo"] == "x"
        assert server.stats.requests == 3 and server.stats.max_per_request == 2


def test_a_reply_fits_within_max_tokens_unless_the_cap_is_below_the_briefest_reply() -> None:
    with SimulatorThread() as server:
        short = post(server.url, "tell me", max_tokens=3).json()
        assert short["choices"][0]["finish_reason"] == "stop"
        assert 0 < short["usage"]["completion_tokens"] <= 3
        label = post(server.url, 'Classify: positive, negative or neutral. Reply as JSON '
                     '{"label": ...}', max_completion_tokens=20).json()
        assert label["choices"][0]["finish_reason"] == "stop"
        assert json.loads(label["choices"][0]["message"]["content"])["label"] in (
            "positive", "negative", "neutral")
        tiny = post(server.url, "tell me", max_tokens=2, response_format={"type": "json_object"})
        assert tiny.json()["choices"][0]["finish_reason"] == "length"
        assert tiny.json()["usage"]["completion_tokens"] == 2
        marked = post(server.url, "[sim:finish=length] tell me", max_tokens=100).json()
        assert marked["choices"][0]["finish_reason"] == "length"


def test_structured_outputs_parse_through_the_sdk_and_a_bad_schema_gets_400() -> None:
    class Review(BaseModel):
        label: Literal["positive", "negative", "neutral"]
        confidence: float = Field(ge=0, le=1)
        tags: list[str] = Field(min_length=1)

    with SimulatorThread() as server:
        client = openai.OpenAI(base_url=server.url, api_key="sk-x", max_retries=0)
        reply = client.chat.completions.parse(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "A great film!"}],
            response_format=Review, max_tokens=40)
        assert isinstance(reply.choices[0].message.parsed, Review)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens <= 40
        nowhere = {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/Missing"}}}
        with pytest.raises(openai.BadRequestError, match="Invalid schema for response_format"):
            client.chat.completions.create(model="gpt-4o-mini", response_format=nowhere,
                                           messages=[{"role": "user", "content": "x"}])


def test_rate_limit_per_second_answers_429_with_openai_headers() -> None:
    with SimulatorThread(SimulatorConfig(rpm=120)) as server:
        statuses = [post(server.url, f"q{i}") for i in range(4)]
        assert [r.status_code for r in statuses] == [200, 200, 429, 429]
        limited = statuses[2]
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after-ms"]) > 0
        assert limited.headers["retry-after"].isdigit()
        ok = statuses[0]
        assert ok.headers["x-ratelimit-limit-requests"] == "120"
        assert "x-ratelimit-remaining-requests" in ok.headers
        assert ok.headers["x-ratelimit-reset-requests"].endswith("s")


def test_a_per_second_limit_refills_over_time_on_its_own_clock() -> None:
    limit = Limit(120, "second", now=0.0)  # 2 a second, holding at most 2
    assert [limit.try_take(1, now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert limit.try_take(1, now=0.0) == pytest.approx(0.5)
    assert limit.try_take(1, now=0.6) == 0.0


def test_rate_limit_per_minute_window_allows_a_burst_then_refuses() -> None:
    with SimulatorThread(SimulatorConfig(rpm=5, window="minute")) as server:
        codes = [post(server.url, f"q{i}").status_code for i in range(7)]
        assert codes == [200] * 5 + [429] * 2


def test_markers_inject_faults_and_counts_let_them_pass() -> None:
    with SimulatorThread() as server:
        assert post(server.url, "[sim:status=503*2]").status_code == 503
        assert post(server.url, "[sim:status=503*2]").status_code == 503
        assert post(server.url, "[sim:status=503*2]").status_code == 200
        assert post(server.url, "[sim:status=429-quota]").json()["error"]["code"] == (
            "insufficient_quota")
        body = post(server.url, "[sim:finish=content_filter]").json()
        assert body["choices"][0]["finish_reason"] == "content_filter"
        with pytest.raises(ValueError):
            json.loads(post(server.url, "[sim:malformed]").text)
        with pytest.raises(httpx2.HTTPError):
            post(server.url, "[sim:drop]")


def test_wrong_key_gets_401() -> None:
    with SimulatorThread(SimulatorConfig(api_key="sk-right")) as server:
        response = post(server.url, "hi")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_models_and_stats_endpoints() -> None:
    with SimulatorThread() as server:
        post(server.url, "one")
        assert httpx2.get(server.url + "/models").json()["object"] == "list"
        stats = httpx2.get(server.url.removesuffix("/v1") + "/sim/stats").json()
        assert stats["requests"] == 1 and stats["by_status"] == {"200": 1}


@pytest.mark.parametrize("seconds, text", [(0.02, "20ms"), (1.5, "1.5s"), (360, "6m0s")])
def test_durations_are_formatted_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("shape", "at_once", "in_first_60s"), [
    ("bucket-1s", 100, 100 + 5900), ("bucket-60s", 6000, 6000 + 5900),
    ("sliding-1s", 100, 100 + 5800), ("sliding-60s", 6000, 6000), ("fixed-60s", 6000, 6000)])
def test_each_limit_shape_admits_what_it_should(shape: str, at_once: int,
                                                 in_first_60s: int) -> None:
    limit = Limit(6000, shape, 0.0)
    taken = sum(limit.try_take(1, 0.0) == 0 for _ in range(10_000))
    assert taken == at_once
    assert limit.headers("requests", 0.0)["x-ratelimit-remaining-requests"] == "0"
    # then at a steady 200 a second (twice the limit) until just before the minute's end
    for step in range(1, 11_800):
        taken += limit.try_take(1, step / 200) == 0
    assert abs(taken - in_first_60s) <= 10, taken
    if shape.startswith("sliding"):
        # no window of the span holds more than the limit allows
        assert limit.used <= limit.capacity
