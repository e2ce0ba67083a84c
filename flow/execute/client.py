"""The SDK client the online executor sends through, and the headers it reads back."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from flow.config import CallConfig
from flow.errors import FatalCallError
from flow.open_files import is_out_of_files, out_of_files_hint


def make_client(config: CallConfig, base_url: str | None, api_key: str | None) -> openai.AsyncOpenAI:
    """An `AsyncOpenAI` on the aiohttp transport, with the SDK's retries off."""
    try:
        return openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=config.timeout_s,
            default_headers=config.headers or None,
            http_client=openai.DefaultAioHttpClient(
                limits=httpx2.Limits(max_connections=config.concurrency,
                                     max_keepalive_connections=config.concurrency)))
    except OSError as e:  # it reads certificates (and imports modules) as it is built
        if is_out_of_files(e):
            raise FatalCallError(f"cannot set up connections: {out_of_files_hint()}") from None
        raise


SDK_ONLY = ("extra_body", "extra_query")  # params the SDK takes apart, never sent as named


@asynccontextmanager
async def post_raw(client: openai.AsyncOpenAI, path: str, request: Mapping[str, Any],
                   request_json: str) -> AsyncIterator[httpx2.Response]:
    """POST a request through the client and yield its response with the body unread.

    The SDK's `create` checks and transforms every param, serializes the body again and
    parses every reply into models; flow needs none of it: the request is sent as the JSON
    it is keyed by, and the reply is read as bytes. Headers, auth, timeouts and errors are
    the SDK's own (`APIStatusError` for a status >= 400, `APIConnectionError`).
    """
    if any(name in request for name in SDK_ONLY):
        # a provider's own params (extra_body) go into the body as the SDK puts them there
        body = {name: value for name, value in request.items() if name not in SDK_ONLY}
        sending = client.post(path, body=body, cast_to=httpx2.Response, stream=True, options={
            "extra_json": request.get("extra_body") or {},
            "params": request.get("extra_query") or {}})
    else:
        sending = client.post(path, content=request_json.encode(), cast_to=httpx2.Response,
                              stream=True)
    response = await sending
    try:
        yield response
    finally:
        await response.aclose()


def rate_headers(headers: httpx2.Headers) -> dict[str, str]:
    """The `x-ratelimit-*` headers in one pass (each `Headers.get` is a scan of them all)."""
    return {key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in headers.raw if key[:11].lower() == b"x-ratelimit"}


def retry_headers(headers: httpx2.Headers) -> dict[str, str]:
    """The `retry-after-ms` and `retry-after` headers, where the server sent them."""
    return {name: value for name in ("retry-after-ms", "retry-after")
            if (value := headers.get(name)) is not None}


TAIL_BYTES = 65_536


@dataclass(slots=True)
class Body:
    """A response body read with a bound: whole when it fits in `limit` bytes, else only
    its size and its last `TAIL_BYTES` (where the usage of the paid reply is)."""

    content: bytes | None
    size: int
    tail: bytes = b""


async def read_capped(chunks: AsyncIterable[bytes], limit: int) -> Body:
    """Read a body holding at most `limit` + `TAIL_BYTES` bytes of it in memory at a time."""
    parts: list[bytes] = []
    size = 0
    tail = b""
    async for chunk in chunks:
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
            continue
        if parts:
            tail = b"".join(parts)
            parts.clear()
        tail = (tail + chunk)[-TAIL_BYTES:]
    return Body(b"".join(parts), size) if size <= limit else Body(None, size, tail)
