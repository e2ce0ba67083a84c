"""Requests posted through the SDK's client as the JSON they are keyed by."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest

from flow.endpoints.chat import PATH
from flow.execute.client import post_raw
from flow.keys import canonical_json


def recording_client(seen: list[httpx2.Request], status: int = 200) -> openai.AsyncOpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(status, json={"error": {"message": "no"}} if status >= 400
                               else {"choices": []})

    return openai.AsyncOpenAI(base_url="http://server/v1", api_key="sk-test", max_retries=0,
                              http_client=httpx2.AsyncClient(
                                  transport=httpx2.MockTransport(answer)))


async def test_a_request_is_posted_as_its_keyed_json() -> None:
    seen: list[httpx2.Request] = []
    request = {"model": "m", "messages": [{"role": "user", "content": "é"}], "seed": 1}
    async with post_raw(recording_client(seen), PATH, request, canonical_json(request)) as raw:
        assert json.loads(await raw.aread()) == {"choices": []}
    assert str(seen[0].url) == "http://server/v1/chat/completions"
    assert seen[0].content == canonical_json(request).encode()
    assert seen[0].headers["content-type"] == "application/json"
    assert seen[0].headers["authorization"] == "Bearer sk-test"


async def test_extra_body_and_extra_query_go_where_the_sdk_puts_them() -> None:
    seen: list[httpx2.Request] = []
    request: dict[str, Any] = {"model": "m", "messages": [], "extra_body": {"top_k": 5},
                               "extra_query": {"api-version": "2024"}}
    async with post_raw(recording_client(seen), PATH, request, canonical_json(request)):
        pass
    assert json.loads(seen[0].content) == {"model": "m", "messages": [], "top_k": 5}
    assert seen[0].url.params["api-version"] == "2024"


async def test_an_error_status_is_the_sdks_own_error() -> None:
    request = {"model": "m", "messages": []}
    with pytest.raises(openai.APIStatusError) as caught:
        async with post_raw(recording_client([], 503), PATH, request, canonical_json(request)):
            pass
    assert caught.value.status_code == 503
