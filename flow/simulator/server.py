"""An OpenAI-compatible server for trying pipelines and testing flow without a key.

`POST /v1/chat/completions` answers deterministically from the request (the same request
always gets the same reply) in the shape it asks for and within its `max_tokens` (see
`replies`), with `usage` counted by the real tokenizer, optional latency and jitter, rate
limits answered the way OpenAI answers them (429 body, `retry-after-ms`, `x-ratelimit-*` on
every response), and faults injected at given rates. `GET /v1/models` lists models;
`GET /sim/stats` reports how many requests arrived, and how many times each distinct request
did. A `json_schema` no value can be made for (a `$ref` that leads nowhere) is answered 400.
The reply itself, or the error, is made by `completions`, which batch lines share.

`/v1/files` (`files`) and `/v1/batches` (`batches`) serve OpenAI's Batch API, with faults of
its own (`SimulatorConfig.batch_faults`); batches progress on a simulated clock that
`POST /sim/advance` (`{"seconds": N}`) moves forward, so tests never wait for one.

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp import web

from flow.keys import content_key
from flow.simulator.batches import Batches
from flow.simulator.clock import Clock
from flow.simulator.completions import (
    Reply,
    draft_reply,
    error_reply,
    finish_reply,
    invalid_body,
    read_marker,
    read_request,
    status_fault,
)
from flow.simulator.config import SimulatorConfig, SimulatorStats
from flow.simulator.embeddings import count_tokens, embeddings_body, read_embeddings_request
from flow.simulator.files import Files, send_error
from flow.simulator.limits import Limit, format_duration
from flow.simulator.replies import breaks_schema
from flow.simulator.responses import as_chat_body, as_response_text
from flow.tokens import count_prompt_tokens

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulator:
    """The server's state and handlers; serve it with `serve()` or `SimulatorThread`."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self._random = random.Random(config.seed)
        if config.rpm or config.tpm:
            # limits are checked on arrival: the tokenizer's first use (most of a second, the
            # loop blocked) comes now, or the first requests would be stamped late, together
            count_prompt_tokens([{"role": "user", "content": "warm"}], "gpt-4o-mini")
        now = time.monotonic()
        self._started = now
        self._limits = {kind: Limit(value, config.window, now) for kind, value in
                        (("requests", config.rpm), ("tokens", config.tpm)) if value}
        self.clock = Clock()
        self.files = Files(self.clock, self.stats)
        self.batches = Batches(config, self.stats, self.clock, self.files)

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=64 * 1024 * 1024,
                              middlewares=[self._check_key])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        self.files.add_routes(app.router)
        self.batches.add_routes(app.router)
        app.router.add_get("/sim/stats", self.stats_handler)
        app.router.add_post("/sim/advance", self.advance_handler)
        return app

    def advance(self, seconds: float) -> None:
        """Move the simulated clock forward, and the batches with it."""
        self.clock.advance(seconds)
        self.batches.refresh()

    @web.middleware
    async def _check_key(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Files and batches refuse a request without the configured key, as chat does."""
        if request.path.startswith(("/v1/files", "/v1/batches")):
            refused = self._refuse_key(request)
            if refused is not None:
                return web.Response(status=refused.status, text=refused.text,
                                    content_type="application/json")
        return await handler(request)

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`."""
        names = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-5-mini", "sim-echo"]
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "flow-simulator"}
            for name in names]})

    async def stats_handler(self, request: web.Request) -> web.Response:
        """`GET /sim/stats`."""
        self.batches.refresh()
        return web.json_response(self.stats.as_json())

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/responses`: answered as chat, in the Responses shape."""
        return await self.chat_completions(request, responses=True)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/embeddings`: a vector per input (see `embeddings`), with the limits,
        latency, faults and headers chat has."""
        self.stats.requests += 1
        self.stats.last_headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._send(invalid_body())
        refused = self._refuse_key(request)
        if refused is not None:
            return self._send(refused)
        asked = read_embeddings_request(body)
        if isinstance(asked, Reply):
            return self._send(asked)
        request_key = content_key(body)
        self.stats.by_request[request_key] += 1
        self.stats.by_model[asked.model] += 1
        self.stats.embedded_inputs += len(asked.inputs)
        marker = read_marker("\n".join(asked.inputs), self.stats.by_request[request_key])
        counts = count_tokens(asked)
        if isinstance(counts, Reply):
            return self._send(counts)
        tokens = sum(counts)
        now = time.monotonic()
        waits = {kind: limit.try_take(1 if kind == "requests" else tokens, now)
                 for kind, limit in self._limits.items()}
        if any(waits.values()):
            kind = max(waits, key=lambda k: waits[k])
            return self._rate_limited(kind, waits[kind], now)
        delay = self.config.latency_ms + self._random.uniform(0, self.config.jitter_ms)
        if delay:
            await asyncio.sleep(delay / 1000)
        fault = marker or self._outage() or self._random_fault()
        if fault is not None and fault.startswith("status="):
            return self._send(status_fault(fault.removeprefix("status="), "",
                                           self.config.rate_headers))
        if fault == "drop":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        self.stats.tokens += tokens
        return self._send(Reply(200, embeddings_body(asked, tokens)))

    async def chat_completions(self, request: web.Request,
                               responses: bool = False) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        self.stats.requests += 1
        self.stats.last_headers = {k.lower(): v for k, v in request.headers.items()}
        raw = await request.read()
        try:
            body = json.loads(raw)
            chat = read_request(as_chat_body(body) if responses else body)
        except ValueError:
            chat = None
        if chat is None:
            return self._send(invalid_body())
        request_key = content_key(chat.body)
        self.stats.by_request[request_key] += 1
        self.stats.by_model[chat.model] += 1
        refused = self._refuse_key(request)
        if refused is not None:
            return self._send(refused)
        marker = read_marker(chat.text, self.stats.by_request[request_key])
        broken = breaks_schema(chat.body, chat.messages, self.config.schema_break_rate,
                               self.config.schema_rebreak_rate)
        self.stats.schema_broken += broken
        draft = draft_reply(chat, broken)
        if isinstance(draft, Reply):
            return self._send(draft)
        # limits are checked on arrival, as OpenAI does: a 429 comes back at once
        now = time.monotonic()
        waits = {kind: limit.try_take(1 if kind == "requests" else
                                      draft.prompt_tokens + draft.completion_tokens, now)
                 for kind, limit in self._limits.items()}
        if any(waits.values()):
            kind = max(waits, key=lambda k: waits[k])
            return self._rate_limited(kind, waits[kind], now)
        requests = self._limits.get("requests")
        if requests is not None and not requests.shape.startswith("bucket"):
            self.stats.window_peak = max(self.stats.window_peak, round(requests.used))
        delay = self.config.latency_ms + self._random.uniform(0, self.config.jitter_ms)
        if delay:
            self.stats.waiting += 1  # chat requests in their latency at once, at most
            self.stats.most_waiting = max(self.stats.most_waiting, self.stats.waiting)
            try:
                await asyncio.sleep(delay / 1000)
            finally:
                self.stats.waiting -= 1

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
        reply = finish_reply(chat, draft, fault, created=int(time.time()),
                             credentials=_credentials(request),
                             rate_headers=self.config.rate_headers)
        self.stats.tokens += reply.tokens
        if responses and reply.status == 200:
            reply = replace(reply, text=as_response_text(reply.text))
        if fault == "cut" and reply.status == 200:
            return await self._cut_short(request, reply.text)
        if fault == "drip" and reply.status == 200:
            return await self._drip(request, reply.text)
        return self._send(reply)

    async def advance_handler(self, request: web.Request) -> web.Response:
        """`POST /sim/advance` with `{"seconds": N}`: move the simulated clock forward."""
        try:
            self.advance(float((await request.json())["seconds"]))
        except (ValueError, KeyError, TypeError):
            return send_error(400, 'Expected {"seconds": N} with N >= 0.', "seconds")
        return web.json_response({"offset_s": self.clock.offset_s, "now": self.clock.epoch()})

    def _refuse_key(self, request: web.Request) -> Reply | None:
        """The 401 for a request without the configured key, if one is configured."""
        key = self.config.api_key
        if key is None or request.headers.get("Authorization") == f"Bearer {key}":
            return None
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return error_reply(401, "invalid_request_error", "invalid_api_key",
                           f"Incorrect API key provided: {given}. You can find your API "
                           "key in your account settings.")

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

    def _send(self, reply: Reply) -> web.Response:
        response = self._respond(reply.status, reply.text)
        response.headers.update(reply.headers)
        return response

    def _error(self, status: int, kind: str, code: str | None, message: str,
               now: float | None = None) -> web.Response:
        return self._respond(status, error_reply(status, kind, code, message).text, now)

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
