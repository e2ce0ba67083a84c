"""An OpenAI-compatible server for trying pipelines and testing flow without a key.

`POST /v1/chat/completions` answers deterministically from the request (the same request
always gets the same reply) in the shape it asks for and within its `max_tokens` (see
`replies`), with `usage` counted by the real tokenizer, optional latency and jitter, rate
limits answered the way OpenAI answers them (429 body, `retry-after-ms`, `x-ratelimit-*` on
every response), and faults injected at given rates. `GET /v1/models` lists models;
`GET /sim/stats` reports how many requests arrived, and how many times each distinct request
did. A `json_schema` no value can be made for (a `$ref` that leads nowhere) is answered 400.

A prompt can ask for a fault by itself, for tests and demos: `[sim:status=400]` (any code;
`429-quota` for insufficient quota), `[sim:finish=length]`, `[sim:finish=content_filter]`,
`[sim:malformed]`, `[sim:drop]`, `[sim:hang]`, `[sim:cut]` (the body stops half-way),
`[sim:huge]` (a 20 MB body), `[sim:drip]` (the body a byte every `drip_s`), `[sim:finish=none]` (no finish_reason),
`[sim:finish=tool_calls]` (a tool call, as a request with `tools` always gets),
`[sim:status=400-echo]` (an error quoting the request's credential headers),
`[sim:status=429-day]` (a daily limit: retry after 86400 s; `429-40` asks for 40 s),
`[sim:garbage]` (an answer that is not HTTP: a bad status line), `[sim:half]` (a reply
holding half a character, `\\ud83d`, in JSON text), `[sim:echo]` (a 200 reply quoting the
request's credential headers). A count makes the fault pass: `[sim:drop*2]`
drops the first two times that request arrives and answers it normally the third time.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from typing import Any

from aiohttp import web

from flow.keys import content_key
from flow.simulator.config import SimulatorConfig, SimulatorStats
from flow.simulator.limits import Limit, format_duration
from flow.simulator.replies import compose_reply
from flow.simulator.schemas import SchemaError
from flow.tokens import count_prompt_tokens

MARKER = re.compile(
    r"\[sim:(?:(status|finish)=([\w-]+)|(malformed|drop|hang|cut|huge|drip|garbage|half|echo))"
    r"(?:\*(\d+))?\]")
HUGE_BYTES = 20_000_000


class Simulator:
    """The server's state and handlers; serve it with `serve()` or `SimulatorThread`."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self._random = random.Random(config.seed)
        now = time.monotonic()
        self._started = now
        self._limits = {kind: Limit(value, config.window, now) for kind, value in
                        (("requests", config.rpm), ("tokens", config.tpm)) if value}

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/sim/stats", self.stats_handler)
        return app

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`."""
        names = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-5-mini", "sim-echo"]
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "flow-simulator"}
            for name in names]})

    async def stats_handler(self, request: web.Request) -> web.Response:
        """`GET /sim/stats`."""
        return web.json_response(self.stats.as_json())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        self.stats.requests += 1
        self.stats.last_headers = {k.lower(): v for k, v in request.headers.items()}
        raw = await request.read()
        try:
            body = json.loads(raw)
            messages = body["messages"]
            model = str(body["model"])
            if not isinstance(messages, list) or not messages:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._error(400, "invalid_request_error", "invalid_body",
                               "The request body is not a valid chat completion request.")
        request_key = content_key(body)
        self.stats.by_request[request_key] += 1
        self.stats.by_model[model] += 1
        key = self.config.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._error(401, "invalid_request_error", "invalid_api_key",
                               f"Incorrect API key provided: {given}. You can find your API "
                               "key in your account settings.")
        text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        marker = self._marker(text, self.stats.by_request[request_key])
        prompt_tokens = count_prompt_tokens(messages, model)
        finish: str | None
        try:
            reply, completion_tokens, finish = compose_reply(body, messages, model)
        except SchemaError as e:
            return self._error(400, "invalid_request_error", "invalid_json_schema",
                               f"Invalid schema for response_format: {e}")
        # limits are checked on arrival, as OpenAI does: a 429 comes back at once
        now = time.monotonic()
        waits = {kind: limit.try_take(1 if kind == "requests" else
                                      prompt_tokens + completion_tokens, now)
                 for kind, limit in self._limits.items()}
        if any(waits.values()):
            kind = max(waits, key=lambda k: waits[k])
            return self._rate_limited(kind, waits[kind], now)
        delay = self.config.latency_ms + self._random.uniform(0, self.config.jitter_ms)
        if delay:
            await asyncio.sleep(delay / 1000)

        fault = marker or self._outage() or self._random_fault()
        if fault == "drop":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if fault == "hang":
            await asyncio.sleep(self.config.hang_s)
        if fault == "garbage":
            # a server that does not answer in HTTP: a status line that is none
            if request.transport is not None:
                request.transport.write(b"HTTP/1.1 abc OK\r\n\r\n")
                request.transport.close()
            raise asyncio.CancelledError
        if fault and fault.startswith("status="):
            return self._status_fault(fault.removeprefix("status="), _credentials(request))
        if fault and fault.startswith("finish="):
            finish = fault.removeprefix("finish=")
            finish = None if finish == "none" else finish
        if fault == "huge":
            reply = "x" * HUGE_BYTES
        if fault == "half":
            reply = '{"text": "half \ud83d an emoji"}'  # half a character, as JSON text
        if fault == "echo":
            reply = f"{reply} You sent: {_credentials(request)}"
        self.stats.tokens += prompt_tokens + completion_tokens
        if fault == "malformed":
            return self._respond(200, '{"id": "chatcmpl-broken", "choices": [{"mess')
        payload = {
            "id": "chatcmpl-" + content_key(body)[7:31],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": reply, "refusal": None}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": 0}},
            "system_fingerprint": "fp_flow_simulator",
        }
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                                  "message": {"role": "assistant", "content": reply,
                                              "refusal": None}}
        if finish == "tool_calls" or (body.get("tools") and finish == "stop"):
            choice.update(finish_reason="tool_calls", message=_tool_call(
                body.get("tools"), messages, digest=content_key(body)[7:15]))
        payload["choices"] = [choice]
        if fault == "cut":
            return await self._cut_short(request, json.dumps(payload))
        if fault == "drip":
            return await self._drip(request, json.dumps(payload))
        return self._respond(200, json.dumps(payload))

    async def _cut_short(self, request: web.Request, text: str) -> web.StreamResponse:
        """Promise the whole body, send half of it, then close the connection."""
        data = text.encode()
        response = web.StreamResponse(status=200, headers={
            "Content-Type": "application/json", "Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:len(data) // 2])
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    async def _drip(self, request: web.Request, text: str) -> web.StreamResponse:
        """Send the body a byte at a time, `drip_s` apart: every read is quick, the whole slow."""
        data = text.encode()
        response = web.StreamResponse(status=200, headers={
            "Content-Type": "application/json", "Content-Length": str(len(data))})
        await response.prepare(request)
        for index in range(len(data)):
            await response.write(data[index:index + 1])
            await asyncio.sleep(self.config.drip_s)
        await response.write_eof()
        return response

    def _outage(self) -> str | None:
        """Every request in a configured outage window (seconds after start) gets a 503."""
        if not self.config.outages:
            return None
        elapsed = time.monotonic() - self._started
        if any(start <= elapsed < end for start, end in self.config.outages):
            return "status=503"
        return None

    def _marker(self, text: str, arrivals: int) -> str | None:
        """The fault a prompt asks for, if it still applies to this arrival of the request."""
        if "[sim:" not in text:
            return None
        match = MARKER.search(text)
        if match is None:
            return None
        kind, value, bare, times = match.groups()
        if times is not None and arrivals > int(times):
            return None
        return bare if bare else f"{kind}={value}"

    def _random_fault(self) -> str | None:
        config = self.config
        roll = self._random.random()
        for rate, fault in ((config.error_rate, "status=500"),
                            (config.rate_limit_rate, "status=429"),
                            (config.drop_rate, "drop"), (config.hang_rate, "hang"),
                            (config.malformed_rate, "malformed"),
                            (config.truncate_rate, "finish=length"),
                            (config.filter_rate, "finish=content_filter")):
            if roll < rate:
                return fault
            roll -= rate
        return None

    def _rate_limited(self, kind: str, wait: float, now: float) -> web.Response:
        message = (f"Rate limit reached for {kind}. Please try again in "
                   f"{format_duration(wait)}.")
        response = self._error(429, kind, "rate_limit_exceeded", message, now)
        if self.config.rate_headers:
            response.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
            response.headers["retry-after"] = str(max(1, math.ceil(wait)))
        return response

    def _status_fault(self, code: str, authorization: str) -> web.Response:
        if code.endswith("-echo"):
            # a careless gateway: the caller's own header, quoted at the end of a long message
            return self._error(int(code.split("-")[0]), "invalid_request_error", None,
                               "The request was refused. " * 18 + f"You sent: {authorization}")
        if code == "429-day" or (code.startswith("429-") and code[4:].isdigit()):
            daily = code == "429-day"
            response = self._error(429, "requests", "rate_limit_exceeded",
                                   f"Rate limit reached for requests{' per day' * daily}.")
            response.headers["retry-after"] = "86400" if daily else code[4:]
            return response
        if code == "429-quota":
            return self._error(429, "insufficient_quota", "insufficient_quota",
                               "You exceeded your current quota, please check your plan.")
        status = int(code) if code.isdigit() else 500
        if status == 429:
            response = self._error(429, "requests", "rate_limit_exceeded",
                                   "Rate limit reached (injected).")
            if self.config.rate_headers:
                response.headers["retry-after-ms"] = "50"
            return response
        kinds = {400: "invalid_request_error", 401: "invalid_request_error",
                 403: "permission_error", 404: "invalid_request_error"}
        return self._error(status, kinds.get(status, "server_error"), None,
                           f"Simulated error {status}.")

    def _error(self, status: int, kind: str, code: str | None, message: str,
               now: float | None = None) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return self._respond(status, json.dumps(body), now)

    def _respond(self, status: int, text: str, now: float | None = None) -> web.Response:
        self.stats.by_status[status] += 1
        headers = {"x-request-id": f"req_{self.stats.requests}"}
        now = time.monotonic() if now is None else now
        for kind, limit in self._limits.items() if self.config.rate_headers else ():
            headers.update(limit.headers(kind, now))
        return web.Response(status=status, text=text, content_type="application/json",
                            headers=headers)


def _credentials(request: web.Request) -> str:
    """What a careless gateway quotes back: every header that carries a credential."""
    return " ".join(f"{name}: {value}" for name, value in request.headers.items()
                    if "auth" in name.lower() or "key" in name.lower())


def _tool_call(tools: Any, messages: list[Any], digest: str) -> dict[str, Any]:
    """The message of a model that calls the first tool it was given, as OpenAI sends it."""
    first = tools[0] if isinstance(tools, list) and tools else {}
    name = (first.get("function") or {}).get("name", "lookup") if isinstance(first, dict) \
        else "lookup"
    user = next((str(m.get("content", "")) for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), "")
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": f"call_{digest}", "type": "function",
         "function": {"name": name, "arguments": json.dumps({"query": user[:200]})}}]}
