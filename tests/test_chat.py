"""Chat completions on the wire: replies, usage and error statuses, as pure functions."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flow.endpoints.chat import (
    classify_status,
    not_kept_body,
    parse_reply,
    read_usage,
    retry_after_s,
    usage_of_body,
    usage_of_tail,
)
from flow.errors import (
    FatalCallError,
    ItemError,
    RateLimitedError,
    RequestError,
    ResponseError,
    RetryableError,
)
from flow.execute.client import TAIL_BYTES, Body, read_capped
from flow.records import Reply, Usage


def completion(message: Any = None, finish_reason: Any = "stop", **extra: Any) -> str:
    """A chat completion body with one choice."""
    if message is None:
        message = {"role": "assistant", "content": "Paris."}
    choice: dict[str, Any] = {"index": 0, "message": message}
    if finish_reason is not None:
        choice["finish_reason"] = finish_reason
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                       "choices": [choice], **extra})


def unusable(body: str) -> RetryableError:
    """The error a body that is not a chat completion reads as."""
    with pytest.raises(RetryableError) as caught:
        parse_reply(body)
    assert caught.value.error_class == "ResponseError"
    return caught.value


# parse_reply


def test_parse_reply_reads_the_text_and_why_the_model_stopped() -> None:
    body = completion(usage={"prompt_tokens": 9, "completion_tokens": 2})
    reply, value = parse_reply(body)
    assert reply == Reply("Paris.", "stop")
    assert value == json.loads(body)


def test_parse_reply_keeps_an_empty_answer() -> None:
    reply, _ = parse_reply(completion({"role": "assistant", "content": ""}))
    assert reply == Reply("", "stop")


def test_parse_reply_keeps_a_reply_cut_short_at_max_tokens_and_flags_it() -> None:
    reply, _ = parse_reply(completion(finish_reason="length"))
    assert reply.truncated and reply.finish_reason == "length" and reply.text
    with pytest.raises(ResponseError, match=r"cut short at max_tokens \(finish_reason=length\) "
                                            "before any text"):
        parse_reply(completion({"role": "assistant", "content": None}, finish_reason="length"))


def test_parse_reply_fails_a_reply_withheld_by_the_content_filter() -> None:
    with pytest.raises(ResponseError, match=r"content filter \(finish_reason=content_filter\)"):
        parse_reply(completion({"role": "assistant", "content": None},
                               finish_reason="content_filter"))


def test_parse_reply_fails_a_refusal_with_the_models_words() -> None:
    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    with pytest.raises(ResponseError, match="the model refused: I can't help with that."):
        parse_reply(completion(message))


def test_response_errors_fail_the_item_without_a_retry() -> None:
    with pytest.raises(ResponseError) as caught:
        parse_reply(completion({"role": "assistant", "content": None},
                               finish_reason="content_filter"))
    assert isinstance(caught.value, ItemError)
    assert not isinstance(caught.value, RetryableError)
    assert caught.value.error_class == "ResponseError"


def test_parse_reply_retries_a_reply_with_no_text_and_no_refusal() -> None:
    error = unusable(completion({"role": "assistant", "content": None}))
    assert "no text content" in str(error)


def test_parse_reply_retries_a_reply_without_finish_reason() -> None:
    error = unusable(completion(finish_reason=None))
    assert "no finish_reason" in str(error)


@pytest.mark.parametrize("body", [
    json.dumps({"choices": []}),
    json.dumps({"object": "chat.completion"}),
    json.dumps({"choices": [{"finish_reason": "stop"}]}),
    json.dumps({"choices": "no"}),
    "<html>502 Bad Gateway</html>",
    "",
    json.dumps([{"choices": []}]),
    json.dumps("a string"),
    "null",
], ids=["no-choices", "choices-missing", "no-message", "choices-a-string", "not-json",
        "empty", "a-json-list", "a-json-string", "null"])
def test_parse_reply_retries_a_body_that_is_not_a_chat_completion(body: str) -> None:
    assert "malformed response body" in str(unusable(body))


def test_parse_reply_retries_a_body_nested_too_deep() -> None:
    unusable("[" * 100_000 + "]" * 100_000)


def test_a_reply_too_large_to_keep_is_unusable_and_keeps_its_usage() -> None:
    stub = not_kept_body(12_000_000, 10_000_000, Usage(120, 9000, 64))
    with pytest.raises(ResponseError, match=r"response of 12000000 bytes is larger than "
                                            r"call.max_response_bytes \(10000000\)"):
        parse_reply(stub)
    usage = usage_of_body(stub)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (120, 9000)


def test_a_reply_too_large_to_keep_without_usage_reads_as_no_usage() -> None:
    stub = not_kept_body(12_000_000, 10_000_000, None)
    with pytest.raises(ResponseError, match="max_response_bytes"):
        parse_reply(stub)
    assert usage_of_body(stub) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10)
finish_reasons = st.sampled_from(["stop", "length", "content_filter", "tool_calls"])
messages = st.fixed_dictionaries(
    {"content": st.text() | json_values}, optional={"refusal": json_values}) | json_values
choices = st.fixed_dictionaries(
    {"message": messages}, optional={"finish_reason": finish_reasons | json_values}) | json_values
chat_like = st.fixed_dictionaries(
    {"choices": st.lists(choices, min_size=1, max_size=2) | json_values},
    optional={"flow_not_kept": json_values, "usage": json_values})


@given(st.text() | json_values.map(json.dumps) | chat_like.map(json.dumps))
def test_parse_reply_on_any_text_raises_only_flows_errors(body: str) -> None:
    try:
        reply, _ = parse_reply(body)
    except (ResponseError, RetryableError):
        return
    assert isinstance(reply.text, str)
    assert isinstance(reply.finish_reason, str)


# read_usage


def test_read_usage_reads_cached_prompt_tokens() -> None:
    value = {"usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                       "prompt_tokens_details": {"cached_tokens": 64}}}
    assert read_usage(value) == Usage(120, 30, 64)


def test_read_usage_without_prompt_tokens_details_has_no_cached_tokens() -> None:
    assert read_usage({"usage": {"prompt_tokens": 120, "completion_tokens": 30}}) == \
        Usage(120, 30, 0)


@pytest.mark.parametrize("garbage", [-5, "12", None, 1.5, [3], {"n": 3}])
def test_read_usage_counts_garbage_as_zero(garbage: Any) -> None:
    value = {"usage": {"prompt_tokens": garbage, "completion_tokens": garbage,
                       "prompt_tokens_details": {"cached_tokens": garbage}}}
    assert read_usage(value) == Usage(0, 0, 0)


def test_read_usage_counts_booleans_as_zero() -> None:
    value = {"usage": {"prompt_tokens": True, "completion_tokens": True,
                       "prompt_tokens_details": {"cached_tokens": True}}}
    usage = read_usage(value)
    assert usage == Usage(0, 0, 0)
    assert usage is not None and type(usage.prompt_tokens) is int


@pytest.mark.parametrize("details", ["64", [64], None])
def test_read_usage_ignores_prompt_tokens_details_that_are_not_an_object(details: Any) -> None:
    value = {"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                       "prompt_tokens_details": details}}
    assert read_usage(value) == Usage(10, 2, 0)


@pytest.mark.parametrize("value", [{}, {"usage": None}, {"usage": "many"}, [1], None, "x"])
def test_read_usage_is_none_when_the_body_reports_none(value: Any) -> None:
    assert read_usage(value) is None


def test_usage_of_body_is_none_for_a_body_that_is_not_json() -> None:
    assert usage_of_body("<html>") is None
    assert usage_of_body("[" * 100_000) is None


# classify_status

ERROR = {"message": "Invalid value for 'temperature'.", "type": "invalid_request_error",
         "param": "temperature", "code": None}


@pytest.mark.parametrize(("status", "name"), [
    (400, "BadRequestError"), (403, "PermissionDeniedError"), (404, "NotFoundError"),
    (422, "UnprocessableEntityError"), (418, "APIStatusError")])
@pytest.mark.parametrize("body", [ERROR, {"error": ERROR}], ids=["sdk-body", "wire-body"])
def test_a_refused_request_fails_the_item_with_the_sdks_name(
        status: int, name: str, body: dict[str, Any]) -> None:
    error = classify_status(status, body, {})
    assert isinstance(error, RequestError)
    assert (error.error_class, error.status_code) == (name, status)
    assert str(error) == f"{status}: Invalid value for 'temperature'."


def test_a_refused_api_key_stops_the_run() -> None:
    error = classify_status(401, {"message": "Incorrect API key provided"}, {})
    assert isinstance(error, FatalCallError)
    assert "refused the API key (401): Incorrect API key provided" in str(error)
    assert "OPENAI_API_KEY" in str(error)


@pytest.mark.parametrize("body", [
    {"message": "You exceeded your current quota.", "code": "insufficient_quota"},
    {"error": {"message": "You exceeded your current quota.", "code": "insufficient_quota"}},
], ids=["sdk-body", "wire-body"])
def test_no_quota_left_stops_the_run(body: dict[str, Any]) -> None:
    error = classify_status(429, body, {"retry-after": "1"})
    assert isinstance(error, FatalCallError)
    assert "no quota left (429 insufficient_quota): You exceeded your current quota." in \
        str(error)


def test_a_429_pauses_the_run_for_the_wait_the_server_asks() -> None:
    error = classify_status(429, {"message": "Rate limit reached", "code": "rate_limit_exceeded"},
                            {"retry-after": "7"})
    assert isinstance(error, RateLimitedError)
    assert (error.error_class, error.status_code, error.retry_after_s) == \
        ("RateLimitError", 429, 7.0)
    assert str(error) == "rate limited (429): Rate limit reached"


def test_a_429_prefers_retry_after_ms_to_retry_after() -> None:
    error = classify_status(429, None, {"retry-after-ms": "1500", "retry-after": "7"})
    assert isinstance(error, RateLimitedError)
    assert error.retry_after_s == 1.5


def test_a_429_without_a_wait_leaves_it_to_the_limiter() -> None:
    error = classify_status(429, None, {})
    assert isinstance(error, RateLimitedError)
    assert error.retry_after_s is None


@pytest.mark.parametrize(("status", "name"), [
    (408, "APIStatusError"), (409, "ConflictError"), (500, "InternalServerError"),
    (503, "InternalServerError")])
def test_transient_statuses_are_retried_without_pausing_the_run(status: int, name: str) -> None:
    error = classify_status(status, {"message": "try again"}, {"retry-after": "2"})
    assert isinstance(error, RetryableError)
    assert not isinstance(error, RateLimitedError)
    assert (error.error_class, error.status_code, error.retry_after_s) == (name, status, 2.0)
    assert str(error) == f"{status}: try again"


@pytest.mark.parametrize("body", [
    None, {}, {"error": None}, {"error": {"code": "server_error"}}, {"message": ""},
    {"error": {"message": None}}, ["not", "an", "object"]])
def test_an_error_body_without_a_message_names_the_status(body: Any) -> None:
    error = classify_status(400, body, {})
    assert isinstance(error, RequestError)
    assert str(error) == "400: HTTP 400"


def test_an_error_given_as_a_string_in_the_body_is_the_message() -> None:
    assert str(classify_status(400, {"error": "model not loaded"}, {})) == "400: model not loaded"


def test_an_error_message_is_cut_at_500_characters() -> None:
    error = classify_status(400, {"message": "x" * 2000}, {})
    assert str(error) == "400: " + "x" * 500


def test_a_plain_text_error_body_is_still_classified_by_its_status() -> None:
    error = classify_status(502, "upstream connect error", {})
    assert isinstance(error, RetryableError)
    assert (error.error_class, error.status_code) == ("InternalServerError", 502)
    error = classify_status(400, "bad request", {})
    assert isinstance(error, RequestError)
    assert error.error_class == "BadRequestError"


def test_a_plain_text_error_body_is_the_message() -> None:
    assert "upstream connect error" in str(classify_status(502, "upstream connect error", {}))


# retry_after_s


@pytest.mark.parametrize(("headers", "wait"), [
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": "0.5"}, 0.5),
    ({"retry-after-ms": "250", "retry-after": "3"}, 0.25),
    ({}, None),
])
def test_retry_after_reads_the_servers_wait_in_seconds(headers: dict[str, str],
                                                        wait: float | None) -> None:
    assert retry_after_s(headers) == wait


@pytest.mark.parametrize("bad", ["soon", "", "nan", "NaN", "inf", "1e999"])
def test_retry_after_ignores_a_value_that_is_not_a_wait(bad: str) -> None:
    assert retry_after_s({"retry-after": bad}) is None
    assert retry_after_s({"retry-after-ms": bad}) is None
    assert retry_after_s({"retry-after-ms": bad, "retry-after": "4"}) == 4.0


@pytest.mark.parametrize("value", ["-3", "-inf"])
@pytest.mark.parametrize("header", ["retry-after-ms", "retry-after"])
def test_retry_after_treats_a_negative_wait_as_no_wait(header: str, value: str) -> None:
    assert retry_after_s({header: value}) == 0.0


def test_a_body_too_large_is_never_held_whole_and_keeps_its_usage() -> None:
    usage = b'"usage": {"prompt_tokens": 12, "completion_tokens": 3456}}'

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"choices": [{"message": {"content": "'
        for _ in range(3_000):  # 30 MB of reply
            yield b"x" * 10_000
        yield b'"}}], ' + usage

    async def read() -> Body:
        return await read_capped(chunks(), 1_000_000)

    tracemalloc.start()
    try:
        body = asyncio.run(read())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000  # bounded while read: 30 MB held, then cut, would pass 30 MB
    assert body.content is None and body.size > 30_000_000
    assert len(body.tail) <= TAIL_BYTES
    assert usage_of_tail(body.tail.decode()) == Usage(12, 3456, 0)
    small = asyncio.run(read_capped(_once(b'{"a": 1}'), 1_000_000))
    assert small.content == b'{"a": 1}' and small.size == 8


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
