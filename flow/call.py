"""The call stage: send one request through `AsyncOpenAI`, retrying with `backoff`.

The SDK's own retries are off (`max_retries=0`); `backoff` owns every retry. Policy:

| what came back                                  | what flow does                              |
|-------------------------------------------------|---------------------------------------------|
| 429 rate limit                                  | pause the whole run (limiter), retry; never counts toward `max_tries` |
| 408, 409, 5xx, timeout, dropped connection      | retry with jittered exponential waits       |
| 200 with a body that is not a chat completion   | retry (counts toward `max_tries`)           |
| 400, 403, 404, 422 and other 4xx                | fail the item at once                       |
| 401, 429 `insufficient_quota`                   | stop the run (`FatalCallError`)             |
| `finish_reason` `length` or `content_filter`    | fail the item, keep the paid response       |

A server's `retry-after-ms` / `retry-after` sets the wait when it gives one. An item is given
up after `max_tries` failed attempts or `max_time_s` seconds, whichever comes first.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import backoff
import httpx2
import openai

from flow.config import CallConfig
from flow.errors import FatalCallError
from flow.limiter import RateLimiter
from flow.prices import Price, cost_usd
from flow.store import AttemptRecord, CallRecord, utc_now
from flow.tokens import count_prompt_tokens, expected_output_tokens

RETRY_STATUS = frozenset({408, 409, 429})
SIMULATED_ORIGIN = "simulator"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 60.0


def endpoint_origin(base_url: str | None, simulated: bool) -> str:
    """The name results are stored under: the endpoint's base URL, or `simulator`."""
    if simulated:
        return SIMULATED_ORIGIN
    return (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def make_client(config: CallConfig, base_url: str | None, api_key: str | None) -> openai.AsyncOpenAI:
    """An `AsyncOpenAI` on the aiohttp transport, with the SDK's retries off."""
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=config.timeout_s,
        http_client=openai.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=config.concurrency,
                                 max_keepalive_connections=config.concurrency)))


class Transient(Exception):
    """An attempt failed in a way that another attempt may fix."""

    def __init__(self, error_class: str, message: str, status_code: int | None = None,
                 retry_after_s: float | None = None, rate_limited: bool = False,
                 progress: _Progress | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.rate_limited = rate_limited
        self.progress = progress


class Permanent(Exception):
    """An attempt failed in a way no retry can fix; the item fails."""

    def __init__(self, error_class: str, message: str, response: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.response = response
        self.body = body


@dataclass(slots=True)
class Reply:
    """A usable response: its text, raw body and usage."""

    text: str
    raw: str
    body: dict[str, Any]


@dataclass(slots=True)
class _Progress:
    """One item's attempts so far."""

    failures: int = 0
    log: list[AttemptRecord] = field(default_factory=list)


@dataclass(slots=True)
class CallCounters:
    """Run-wide counts the progress display reads."""

    attempts: int = 0
    retries: int = 0
    rate_limited: int = 0


class Caller:
    """Sends requests for one call stage and turns what comes back into `CallRecord`s."""

    def __init__(self, config: CallConfig, client: openai.AsyncOpenAI, limiter: RateLimiter,
                 origin: str, price: Price | None, secret: str | None) -> None:
        self._config = config
        self._client = client
        self._limiter = limiter
        self._origin = origin
        self._price = price
        self._secret = secret
        self._output_tokens = expected_output_tokens(config.params, config.expected_output_tokens)
        self.counters = CallCounters()
        # built once: a decorator per call measured 8% of a run's CPU at 900 requests/s
        self._send = backoff.on_exception(
            _waits, Transient, max_tries=None, max_time=config.retry.max_time_s, jitter=None,
            giveup=self._gives_up, on_backoff=self._note_wait, logger=None)(self._attempt)

    def _gives_up(self, error: Exception) -> bool:
        """429s never count toward `max_tries`; every other failure does."""
        if not isinstance(error, Transient) or error.progress is None:
            return True
        if error.rate_limited:
            return False
        error.progress.failures += 1
        return error.progress.failures >= self._config.retry.max_tries

    def _note_wait(self, details: Any) -> None:
        self.counters.retries += 1
        progress: _Progress = details["args"][2]
        if progress.log:
            progress.log[-1].wait_s = round(details["wait"], 3)

    async def call(self, key: str, request: dict[str, Any],
                   request_json: str | None = None) -> tuple[CallRecord, Reply | None]:
        """Send `request` until it succeeds or is given up; a `FatalCallError` stops the run."""
        started_at = utc_now()
        started = time.monotonic()
        progress = _Progress()
        # the tokenizer (tens of MB, tens of µs a request) is loaded only for a token budget
        estimate = 0
        if self._limiter.limit("tokens") is not None:
            estimate = count_prompt_tokens(request["messages"], request["model"]) + \
                self._output_tokens
        record = CallRecord(request_key=key, origin=self._origin, model=request["model"],
                            request=request, status="failed", started_at=started_at,
                            finished_at=started_at, attempt_log=progress.log,
                            request_json=request_json)
        reply: Reply | None = None
        try:
            reply = await self._send(request, estimate, progress)
            record.status = "done"
            record.response = reply.raw
        except Transient as e:
            tries = len(progress.log)
            record.error_class = e.error_class
            record.error = self._redact(
                f"gave up after {tries} attempt{'s' * (tries != 1)} in "
                f"{time.monotonic() - started:.1f} s: {e}")
        except Permanent as e:
            record.error_class = e.error_class
            record.error = self._redact(str(e))
            record.response = e.response
            if e.body is not None:
                self._add_usage(record, e.body)
        if reply is not None:
            self._add_usage(record, reply.body)
        record.attempts = len(progress.log)
        record.finished_at = utc_now()
        record.latency_ms = round((time.monotonic() - started) * 1000, 1)
        return record, reply

    async def _attempt(self, request: dict[str, Any], estimate: int, progress: _Progress) -> Reply:
        reservation = await self._limiter.acquire(estimate)
        self.counters.attempts += 1
        number = len(progress.log) + 1
        started_at = utc_now()
        started = time.monotonic()

        def log(status: int | None, outcome: str, error: str | None = None) -> None:
            progress.log.append(AttemptRecord(
                number, started_at, round((time.monotonic() - started) * 1000, 1), status,
                outcome, self._redact(error) if error else None))

        try:
            raw = await self._client.chat.completions.with_raw_response.create(**request)
            content = raw.content
        except openai.APIStatusError as e:
            self._limiter.observe(rate_headers(e.response.headers))
            self._limiter.settle(reservation, 0)
            log(e.status_code, "error", _status_message(e))
            raise self._classify(e, progress) from None
        except (openai.APIConnectionError, TimeoutError) as e:
            # the aiohttp transport reports a dropped connection as a timeout: tell them apart
            self._limiter.observe(None, reached_server=False)
            timed_out = time.monotonic() - started >= self._config.timeout_s * 0.9
            if timed_out:
                error_class, message = "APITimeoutError", \
                    f"no response within {self._config.timeout_s:g} s"
            else:
                error_class, message = "APIConnectionError", \
                    f"connection failed: {e.__cause__ or e or type(e).__name__}"
            log(None, "timeout" if timed_out else "connection error", message)
            raise Transient(error_class, message, progress=progress) from None
        self._limiter.observe(rate_headers(raw.headers))
        try:
            reply = self._read(content)
        except Transient as e:
            self._limiter.settle(reservation, None)
            log(raw.status_code, "malformed", str(e))
            e.progress = progress
            raise
        except Permanent as e:
            usage = (e.body or {}).get("usage") or {}
            self._limiter.settle(reservation, usage.get("total_tokens"))
            log(raw.status_code, "unusable", str(e))
            raise
        usage = reply.body.get("usage") or {}
        self._limiter.settle(reservation, usage.get("total_tokens"))
        log(raw.status_code, "ok")
        return reply

    def _read(self, content: bytes) -> Reply:
        """The text of a chat completion body, or why it cannot be used."""
        if len(content) > self._config.max_response_bytes:
            # paid for but not kept: a stub marks it paid, so a re-run does not buy it again
            stub = json.dumps({"flow": f"response of {len(content)} bytes not kept"})
            raise Permanent("ResponseError", f"response of {len(content)} bytes is larger than "
                            f"call.max_response_bytes ({self._config.max_response_bytes})",
                            stub, {})
        raw = content.decode("utf-8", errors="replace")
        try:
            body = json.loads(raw)
            choice = body["choices"][0]
            message = choice["message"]
            finish = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError):
            raise Transient("ResponseError",
                            f"malformed response body: {raw[:120]!r}") from None
        text = message.get("content") if isinstance(message, dict) else None
        if finish == "length":
            raise Permanent("ResponseError", "response cut short at max_tokens "
                            "(finish_reason=length); raise max_tokens and run again", raw, body)
        if finish == "content_filter":
            raise Permanent("ResponseError", "response withheld by the provider's content "
                            "filter (finish_reason=content_filter)", raw, body)
        if not isinstance(text, str):
            refusal = message.get("refusal") if isinstance(message, dict) else None
            if refusal:
                raise Permanent("ResponseError", f"the model refused: {refusal}", raw, body)
            raise Transient("ResponseError", f"response has no text content: {raw[:120]!r}")
        if finish is None:
            raise Transient("ResponseError", "response has no finish_reason (cut off?)")
        return Reply(text, raw, body)

    def _classify(self, error: openai.APIStatusError, progress: _Progress) -> Exception:
        status = error.status_code
        message = _status_message(error)
        name = type(error).__name__
        if status == 401:
            return FatalCallError(self._redact(
                f"the endpoint refused the API key (401): {message}. Check OPENAI_API_KEY "
                "or call.api_key"))
        if status == 429:
            if error.code == "insufficient_quota":
                return FatalCallError(self._redact(
                    f"the account has no quota left (429 insufficient_quota): {message}. "
                    "Add credit or use another key, then run again"))
            self.counters.rate_limited += 1
            retry_after = _retry_after_s(error.response.headers)
            self._limiter.on_rate_limited(retry_after)
            return Transient(name, f"rate limited (429): {message}", status, retry_after, True,
                             progress)
        if status in RETRY_STATUS or status >= 500:
            return Transient(name, f"{status}: {message}", status,
                             _retry_after_s(error.response.headers), progress=progress)
        return Permanent(name, f"{status}: {message}")

    def _add_usage(self, record: CallRecord, body: dict[str, Any]) -> None:
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        record.prompt_tokens, record.completion_tokens, record.cached_tokens = (
            prompt, completion, cached)
        record.cost_usd = cost_usd(self._price, prompt, completion, cached)

    def _redact(self, text: str) -> str:
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "[REDACTED]")
        return text


def _waits() -> Generator[float, Exception | None, None]:
    """backoff wait generator: the server's retry-after when it gives one, else full jitter."""
    error = yield 0.0
    exponent = 0
    while True:
        ceiling = min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** exponent)
        exponent += 1
        retry_after = getattr(error, "retry_after_s", None)
        if retry_after is not None and retry_after >= 0:
            wait = retry_after + random.uniform(0, min(1.0, 0.1 + retry_after * 0.2))
        else:
            wait = random.uniform(0, ceiling)
        error = yield wait


def rate_headers(headers: httpx2.Headers) -> dict[str, str]:
    """The `x-ratelimit-*` headers in one pass (each `Headers.get` is a scan of them all)."""
    return {key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in headers.raw if key[:11].lower() == b"x-ratelimit"}


def _retry_after_s(headers: httpx2.Headers) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


def _status_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
    return str(error.message)[:500]
