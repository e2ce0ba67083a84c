"""The online executor: `concurrency` workers send calls through `AsyncOpenAI` now.

The SDK's own retries are off (`max_retries=0`); `backoff` owns every retry, giving up on
what is not a `RetryableError` (the error tree says which is which, `flow.errors`). A 429
pauses every sender through the limiter and never counts toward `max_tries`; anything else
retryable does. A server's `retry-after-ms` / `retry-after` sets the wait when it gives one.
A call is given up after `max_tries` failed attempts or `max_time_s` seconds, whichever
comes first. A worker takes its next call only once `deliver` has put its result on disk,
so a kill loses at most the calls in flight.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import backoff
import httpx2
import openai

from flow.config import CallConfig
from flow.endpoints.chat import (
    classify_status,
    not_kept_body,
    usage_of_tail,
)
from flow.endpoints.embeddings import estimate_tokens
from flow.endpoints.wire import endpoint_named, usage_of_body
from flow.errors import FatalCallError, ItemError, RateLimitedError, RequestError, RetryableError
from flow.execute import Deliver, ExecutorCounters
from flow.execute.client import post_raw, rate_headers, read_capped, retry_headers
from flow.limiter import RateLimiter
from flow.open_files import is_out_of_files, out_of_files_hint
from flow.records import Attempt, Call, CallResult, Reply, Usage, utc_now
from flow.redact import Redactor
from flow.tokens import PromptTokens


@dataclass(slots=True)
class _Paid:
    """A reply received at HTTP 200 that cannot be used; kept, since it was paid for."""

    body: str
    usage: Usage | None
    error: ItemError


@dataclass(slots=True)
class _Progress:
    """One call's attempts so far, and what its retried replies were billed."""

    failures: int = 0
    log: list[Attempt] = field(default_factory=list)
    # a 200 that reports usage was paid for, even when its body cannot be used: retried,
    # it still counts, added to the reply the call ends with (or kept, if it ends without)
    retried_usage: Usage | None = None
    retried_body: str | None = None
    # when its first attempt went: the time before it waited for the limiter, not the server
    first_sent: tuple[str, float] | None = None  # (UTC time, monotonic seconds)

    def add_retried(self, body: str, usage: Usage) -> None:
        """Count a paid reply that is retried."""
        self.retried_usage = usage.plus(self.retried_usage)
        self.retried_body = body


class _Unsent(Exception):
    """The run began to stop while the call waited for the limiter, or it could not open a
    connection: it was never sent."""


class OnlineExecutor:
    """Sends calls now, `concurrency` at a time, paced by `limiter`."""

    def __init__(self, config: CallConfig, client: openai.AsyncOpenAI, limiter: RateLimiter,
                 secrets: list[str], stop: asyncio.Event | None = None) -> None:
        self._config = config
        self._endpoint = endpoint_named(config.endpoint)
        self._stop = stop or asyncio.Event()
        self.out_of_files: FatalCallError | None = None
        # workers waiting with nothing in flight (to retry, or for the limiter), and those
        # of them a stop request woke
        self._idle: set[asyncio.Task[Any]] = set()
        self._woken: set[asyncio.Task[Any]] = set()
        self._client = client
        self._limiter = limiter
        self._redact = Redactor(secrets)
        self._prompts = PromptTokens()
        self.counters = ExecutorCounters()
        # built once: a decorator per call measured 8% of a run's CPU at 900 requests/s
        self._send = backoff.on_exception(
            _waits, RetryableError, max_tries=None, max_time=config.retry.max_time_s,
            jitter=None, giveup=self._gives_up, on_backoff=self._note_wait, logger=None,
            first_s=config.retry.first_wait_s, max_s=config.retry.max_wait_s)(self._attempt)

    async def execute(self, calls: AsyncIterable[Call], deliver: Deliver) -> None:
        """Send every call with `concurrency` workers; raise `FatalCallError` to stop the run.

        A worker takes the next call only when it is free: nothing waits in a queue, so
        when `calls` stops (a stop request, the budget) only the calls in flight go on.
        """
        source = aiter(calls)
        turn = asyncio.Lock()

        async def next_call() -> Call | None:
            async with turn:  # an async generator serves one caller at a time
                return await anext(source, None)

        workers = [asyncio.create_task(self._work(next_call, deliver))
                   for _ in range(self._config.concurrency)]
        waker = asyncio.create_task(self.wake_on_stop())
        try:
            for finished in asyncio.as_completed(workers):
                await finished  # the first failure (a fatal error, a store error) ends all
            if self.out_of_files is not None:
                raise self.out_of_files
        finally:
            for task in (*workers, waker):
                task.cancel()
            await asyncio.gather(*workers, waker, return_exceptions=True)

    async def wake_on_stop(self) -> None:
        """On a stop request, end the waits between retries and for the rate limiter:
        nothing is in flight there, so their calls are given back unsent. Besides `execute`,
        a batch stage runs it for its re-asks, which go out through `call`."""
        await self._stop.wait()
        for task in self._idle - self._woken:  # a task is woken once, whoever wakes it
            self._woken.add(task)
            task.cancel()

    async def call(self, call: Call) -> CallResult:
        """Send one call until it succeeds or is given up; `FatalCallError` stops the run."""
        started_at = utc_now()
        started = time.monotonic()
        progress = _Progress()
        estimate = chars = 0
        messages = call.request.get("messages", call.request.get("input", []))
        if self._endpoint.name == "embeddings":
            estimate = estimate_tokens(messages)  # a packed request's texts
        elif self._limiter.limit("tokens") is not None:
            # the tokenizer (tens of MB, tens of µs a request) only while the budget binds
            estimate, chars = self._prompts.count(messages, call.request["model"],
                                                  self._limiter.tokens_bind())
        result = CallResult(call, started_at, started_at, 0.0, progress.log)
        task = asyncio.current_task()
        try:
            outcome = await self._send(call, estimate, progress)
        except _Unsent:
            result.unsent = True
        except asyncio.CancelledError:
            if task is None or task not in self._woken:
                raise
            # woken by a stop request from a wait with nothing in flight: not sent
            self._woken.discard(task)
            self._idle.discard(task)
            task.uncancel()
            result.unsent = True
        except RetryableError as e:
            tries = len(progress.log)
            retry = self._config.retry
            why = (f"call.retry.max_tries is {retry.max_tries}" if tries >= retry.max_tries
                   else f"call.retry.max_time_s is {retry.max_time_s:g} s")
            result.error_class = e.error_class
            result.error = self._redact.text(
                f"gave up after {tries} attempt{'s' * (tries != 1)} in "
                f"{time.monotonic() - started:.1f} s ({why}): {e}")
            result.body = progress.retried_body
        except ItemError as e:
            result.error_class, result.error = e.error_class, self._redact.text(str(e))
            if isinstance(e, RequestError):
                result.refused_param = e.param
        else:
            if isinstance(outcome, _Paid):
                result.body, result.usage = outcome.body, outcome.usage
                result.error_class = outcome.error.error_class
                result.error = self._redact.text(str(outcome.error))
            else:
                result.body, result.usage, result.reply = outcome
                if chars and result.usage is not None:
                    self._prompts.note(chars, len(messages), result.usage.prompt_tokens)
        if progress.retried_usage is not None:
            result.usage = progress.retried_usage.plus(result.usage)
        result.finished_at = utc_now()
        if progress.first_sent is not None:
            result.started_at, started = progress.first_sent
        result.latency_ms = round((time.monotonic() - started) * 1000, 1)
        return result

    async def _work(self, next_call: Callable[[], Awaitable[Call | None]],
                    deliver: Deliver) -> None:
        while (call := await next_call()) is not None:
            self.counters.in_flight += 1
            try:
                result = await self.call(call)
            finally:
                self.counters.in_flight -= 1
            await deliver(result)

    def _gives_up(self, error: Exception) -> bool:
        """429s never count toward `max_tries`; every other failure does."""
        if isinstance(error, RateLimitedError):
            return False
        progress = getattr(error, "progress", None)
        if not isinstance(progress, _Progress):
            return True
        progress.failures += 1
        return progress.failures >= self._config.retry.max_tries

    def _note_wait(self, details: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._idle.add(task)  # until its next attempt is let through by the limiter
            if self._stop.is_set():
                # the stop came while this attempt was in flight: no wait begins
                self._woken.add(task)
                task.cancel()
        self.counters.retries += 1
        progress: _Progress = details["args"][2]
        if progress.log:
            progress.log[-1].wait_s = round(details["wait"], 3)

    async def _attempt(self, call: Call, estimate: int,
                       progress: _Progress) -> tuple[str, Usage | None, Reply] | _Paid:
        if self._stop.is_set():
            raise _Unsent
        task = asyncio.current_task()
        if task is not None:
            self._idle.add(task)
        reservation = await self._limiter.acquire(estimate)
        if task is not None:
            self._idle.discard(task)
        if self._stop.is_set():
            # the run is stopping: a call the limiter held back is not sent at all
            self._limiter.settle(reservation, 0)
            raise _Unsent
        self.counters.attempts += 1
        number = len(progress.log) + 1
        started_at = utc_now()
        started = time.monotonic()
        progress.first_sent = progress.first_sent or (started_at, started)

        def log(status: int | None, outcome: str, error: str | None = None) -> None:
            progress.log.append(Attempt(
                number, started_at, round((time.monotonic() - started) * 1000, 1), status,
                outcome, self._redact.text(error) if error else None))

        try:
            # timeout_s bounds the whole request, not each read: a server sending a byte a
            # second is cut off; the body is read with a bound, never whole into memory
            async with asyncio.timeout(self._config.timeout_s):
                async with post_raw(self._client, self._endpoint.path, call.request, call.request_json) as raw:
                    received = await read_capped(raw.aiter_bytes(),
                                                 self._config.max_response_bytes)
        except openai.APIStatusError as e:
            headers = rate_headers(e.response.headers)
            self._limiter.observe(headers, reservation=reservation)
            self._limiter.settle(reservation, 0)
            # the key is taken out before any message is cut, so no part of it is ever kept
            error = classify_status(e.status_code, self._redact.value(e.body),
                                    retry_headers(e.response.headers))
            log(e.status_code, "error", str(error))
            if isinstance(error, RateLimitedError):
                self._pause_everyone(error.retry_after_s)
            if isinstance(error, FatalCallError):
                raise error from None
            raise _tagged(error, progress) from None
        except (openai.APIConnectionError, httpx2.HTTPError, aiohttp.ClientError,
                TimeoutError) as e:
            # a body cut short while read is an httpx2 error, which the SDK does not wrap; the
            # aiohttp transport passes on what it does not map (a reply that is not HTTP: a
            # bad status line) and reports a dropped connection as a timeout: tell them apart
            self._limiter.observe(None, reached_server=False)
            if is_out_of_files(e):
                # every new connection would fail alike: start no more, let the calls in
                # flight bring their replies home, then stop the run; this item stays pending
                self._limiter.settle(reservation, 0)
                self.out_of_files = self.out_of_files or FatalCallError(
                    f"cannot connect to {self._client.base_url}: {out_of_files_hint()}")
                self._stop.set()
                raise _Unsent from None
            if time.monotonic() - started >= self._config.timeout_s * 0.9:
                error = RetryableError(f"no response within {self._config.timeout_s:g} s",
                                       "APITimeoutError")
                log(None, "timeout", str(error))
            else:
                error = RetryableError(
                    f"connection failed: {e.__cause__ or e or type(e).__name__}",
                    "APIConnectionError")
                log(None, "connection error", str(error))
            raise _tagged(error, progress) from None
        self._limiter.observe(rate_headers(raw.headers), reservation=reservation)
        if received.content is None:
            # paid for, too large to keep: a stub with its usage reads as unusable below
            body = not_kept_body(received.size, self._config.max_response_bytes,
                                 usage_of_tail(received.tail.decode("utf-8", errors="replace")))
        else:
            # a server that echoes the request's headers back never gets the key into the store
            body = self._redact.text(received.content.decode("utf-8", errors="replace"))
        try:
            reply, value = self._endpoint.parse_reply(body)
        except RetryableError as e:
            usage = usage_of_body(body)
            self._limiter.settle(reservation, _total(usage))
            if usage is not None:
                progress.add_retried(body, usage)
            log(raw.status_code, "malformed", str(e))
            raise _tagged(e, progress) from None
        except ItemError as e:
            usage = usage_of_body(body)
            self._limiter.settle(reservation, _total(usage))
            log(raw.status_code, "unusable", str(e))
            return _Paid(body, usage, e)
        usage = self._endpoint.read_usage(value)
        self._limiter.settle(reservation, _total(usage))
        if usage is not None:
            self._limiter.note_reply(usage.completion_tokens)
        log(raw.status_code, "ok")
        return body, usage, reply

    def _pause_everyone(self, wait_s: float | None) -> None:
        """A 429: the limiter pauses every sender for the server's wait, up to max_wait_s;
        a wait longer than any item may take (a daily limit's 86400 s) stops the run."""
        self.counters.rate_limited += 1
        retry = self._config.retry
        if wait_s is not None and wait_s > retry.max_time_s:
            raise FatalCallError(
                f"the endpoint asks every request to wait {wait_s:,.0f} s (429 retry-after), "
                f"longer than call.retry.max_time_s ({retry.max_time_s:g} s): run again once "
                "the limit resets")
        self._limiter.on_rate_limited(None if wait_s is None else min(wait_s, retry.max_wait_s))


def _tagged(error: Exception, progress: _Progress) -> Exception:
    """The error, carrying the call's progress for `_gives_up` to count."""
    error.progress = progress  # type: ignore[attr-defined]
    return error


def _total(usage: Usage | None) -> int | None:
    return None if usage is None else usage.prompt_tokens + usage.completion_tokens


def _waits(first_s: float, max_s: float) -> Generator[float, Exception | None, None]:
    """backoff wait generator: the server's retry-after when it gives one, else full jitter."""
    error = yield 0.0
    exponent = 0
    while True:
        ceiling = min(max_s, first_s * 2 ** exponent)
        exponent += 1
        retry_after = getattr(error, "retry_after_s", None)
        if retry_after is not None and retry_after >= 0:
            retry_after = min(retry_after, max_s)  # a server's wait, up to retry.max_wait_s
            wait = retry_after + random.uniform(0, min(1.0, 0.1 + retry_after * 0.2))
        else:
            wait = random.uniform(0, ceiling)
        error = yield wait
