"""One shard's life through the Batch API, each step written to the store before the next:

    planned -> uploaded -> creating -> submitted -> terminal -> collected

`creating` is the intent, on disk before `batches.create` is sent (the SDK's retries are
off; metadata names the store and the shard). After a crash, or a create whose outcome is
unknown, the shard is looked up with `batches.list` (by its metadata and input file) and the
batch found is adopted; a new one is created only when none is found after `create_grace_s`.
Collecting streams the output and error files, joined on `custom_id`, and skips what a
collection before it stored already, so collecting twice changes nothing. Lines the batch did
not run (expired, cancelled) are handed back to be sent again, using no attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from datetime import datetime
from typing import Any, Final

import openai

from flow.config import BatchConfig
from flow.errors import FatalCallError
from flow.execute import BatchCounters, Deliver
from flow.execute.batch_files import (
    EMBEDDINGS_URL,
    LineResult,
    failure_of,
    input_line,
    is_token_limited,
    read_line,
)
from flow.execute.batch_run import BatchRun
from flow.records import Call, CallResult, Shard, utc_now

URL: Final = "/v1/chat/completions"
URLS: Final = {"chat": URL, "responses": "/v1/responses",  # by call.endpoint
                "embeddings": EMBEDDINGS_URL}
TERMINAL = ("completed", "failed", "expired", "cancelled")
LIST_PAGE = 100
CREATE_TRIES = 3  # a create whose outcome is unknown, looked up and tried again at most
PROVIDER_TRIES = 8  # a step failing for a passing reason (connection, 5xx, 429), at most
TRANSIENT = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
             openai.InternalServerError)


def crash_point(name: str) -> None:
    """Tests kill the process at an exact step (FLOW_CRASH_AT=name): a real SIGKILL."""
    if os.environ.get("FLOW_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class ShardDriver:
    """Walks shards through their states; see the module docstring."""

    def __init__(self, config: BatchConfig, client: openai.AsyncOpenAI, run: BatchRun,
                 stop: asyncio.Event, detach: bool, counters: BatchCounters) -> None:
        self._config = config
        self._client = client
        self._run = run
        self._stop = stop
        self._detach = detach
        self._counters = counters
        self.stopped_by_budget = False
        self.requeued: list[Call] = []  # lines a batch did not run: to send again
        self.requeued_keys: set[str] = set()  # theirs, so the calls planned meanwhile wait
        self._enqueued: dict[int, int] = {}  # tokens of the batches running, by shard

    async def drive(self, shard: Shard, deliver: Deliver) -> None:
        """Walk `shard` through its states, as far as the run goes.

        Every step can be taken again (the state on disk says where it was), so one that
        fails for a reason that passes (a dropped connection, a 5xx, a 429) is taken again
        after a wait; a refusal stops the run naming the step and the provider's words.
        """
        fresh = False  # whether this process wrote the shard's intent to create
        failures = 0
        while shard.state != "collected" and not self._stop.is_set():
            try:
                fresh, go_on = await self._step(shard, fresh, deliver)
                failures = 0
                if not go_on:
                    return
            except openai.NotFoundError as e:
                if shard.state not in ("submitted", "terminal"):
                    raise FatalCallError(_refusal(shard, e)) from None
                await self._lose(shard, e)
            except TRANSIENT as e:
                fresh, failures = False, failures + 1  # a create's outcome is now unknown
                if failures >= PROVIDER_TRIES:
                    raise FatalCallError(f"{_doing(shard)}: {e}; tried {failures} times. Run "
                                         "again: every batch is picked up where it was") from None
                await self._wait(min(self._config.max_poll_s, 0.05 * 2 ** failures))
            except openai.APIStatusError as e:
                raise FatalCallError(_refusal(shard, e)) from None

    async def _step(self, shard: Shard, fresh: bool,
                    deliver: Deliver) -> tuple[bool, bool]:
        """Take the shard's next step: whether this process wrote its intent to create, and
        whether the walk goes on in this run (not: detached, stopped, over the budget)."""
        book = self._run.book
        if shard.state == "planned":
            await self._upload(shard)
        elif shard.state == "uploaded":
            if not self._run.may_spend(shard.worst_cost_usd or 0.0):
                self.stopped_by_budget = True
                shard.error = "not created: it could take spend past max_cost_usd"
                await book.save(shard)
                return fresh, False
            if not await self._room_for(shard):
                return fresh, False
            shard.state, fresh = "creating", True  # the intent, on disk before the call
            await book.save(shard)
            crash_point("intent")
        elif shard.state == "creating":
            if not await self._create(shard, fresh):
                return fresh, False
        elif shard.state == "submitted":
            if self._detach:
                return fresh, False
            await self._poll(shard)
        elif shard.state == "terminal":
            await self._collect(shard, deliver)
        return fresh, True

    def _requeue(self, calls: list[Call]) -> None:
        """Lines to send again once the shards running end; a call for one of them that
        planning hands over meanwhile is the same request: it is not sent twice."""
        self.requeued += calls
        self.requeued_keys.update(call.key for call in calls)

    async def _lose(self, shard: Shard, error: openai.NotFoundError) -> None:
        """The provider no longer knows the shard's batch or its files (deleted, expired,
        or another server): its lines not collected are sent again."""
        lines = await self._run.book.lines(shard.id)
        await self._run.book.mark(shard.id, [key for key, _ in lines], "requeued")
        self._requeue([Call(key, json.loads(request), request) for key, request in lines])
        self._enqueued.pop(shard.id, None)
        shard.state, shard.error = "collected", f"lost at the provider ({error.message}): " \
                                                 f"its {len(lines):,} lines sent again"
        await self._run.book.save(shard)

    async def _room_for(self, shard: Shard) -> bool:
        """Wait until the batches running leave room for this one in the account's
        enqueued-token limit, when it is known; False: the run stopped meanwhile."""
        limit = self._config.max_enqueued_tokens
        tokens = self._enqueued.get(shard.id)
        if tokens is None:
            lines = await self._run.book.lines(shard.id)
            tokens = sum(self._run.worst_tokens(request) for _, request in lines)
        wait = self._config.first_poll_s
        while (limit is not None and self._enqueued
               and sum(self._enqueued.values()) + tokens > limit):
            await self._wait(wait)  # another batch ends meanwhile and gives room back
            wait = min(max(wait * 2, 0.01), self._config.max_poll_s)
            if self._stop.is_set():
                return False
        self._enqueued[shard.id] = tokens
        return True

    async def _upload(self, shard: Shard) -> None:
        lines = await self._run.book.lines(shard.id)
        with tempfile.TemporaryFile("w+b") as handle:
            for key, request in lines:
                handle.write(input_line(key, request, self._run.url).encode(
                    "utf-8", "surrogatepass"))
                handle.write(b"\n")
            handle.seek(0)
            name = f"flow-{self._run.store_tag}-{shard.id}.jsonl"
            uploaded = await self._client.files.create(file=(name, handle), purpose="batch")
        shard.file_id, shard.state = uploaded.id, "uploaded"
        await self._run.book.save(shard)
        crash_point("uploaded")

    def _metadata(self, shard: Shard) -> dict[str, str]:
        return {"flow_store": self._run.store_tag, "shard": f"{self._run.store_tag}:{shard.id}",
                "stage": self._run.stage}

    async def _find(self, shard: Shard) -> Any | None:
        """The batch a create made for this shard before, if the provider has one (one
        refused for the token limit ran nothing: it is not the shard's batch)."""
        wanted = self._metadata(shard)["shard"]
        async for batch in self._client.batches.list(limit=LIST_PAGE):
            metadata = batch.metadata or {}
            if (metadata.get("shard") == wanted and batch.input_file_id == shard.file_id
                    and not (batch.status == "failed" and is_token_limited(_plain(batch.errors)))):
                return batch
        return None

    async def _create(self, shard: Shard, fresh: bool) -> bool:
        """Adopt the shard's batch if one was made, else create it; False: not now (the
        token limit, a stop).

        A create this process did not just decide (the intent is from a run that died, or
        its outcome is unknown) is looked up first, and again once `create_grace_s` has
        passed since the intent: a create still on its way to the provider is found then.
        """
        for _ in range(CREATE_TRIES):
            found = None if fresh else await self._find(shard)
            if found is None and not fresh:
                left = self._config.create_grace_s - _age_s(shard.updated_at)
                if left > 0:
                    await self._wait(left)
                    found = await self._find(shard)
            if found is None:
                try:
                    found = await self._client.batches.create(
                        input_file_id=shard.file_id or "", endpoint=self._run.url,  # type: ignore[arg-type]
                        completion_window=self._config.completion_window,
                        metadata=self._metadata(shard))
                except (openai.APIConnectionError, openai.APITimeoutError):
                    fresh = False  # it may have been made: look before trying again
                    await self._run.book.save(shard)  # the time the outcome was lost
                    continue
                crash_point("created")
            if found.status == "failed" and is_token_limited(_plain(found.errors)):
                self._enqueued.pop(shard.id, None)
                shard.state, shard.error = "uploaded", "deferred: token_limit_exceeded"
                await self._run.book.save(shard)
                await self._wait(self._config.max_poll_s)
                return not self._stop.is_set()
            shard.batch_id, shard.state, shard.error = found.id, "submitted", None
            shard.status = found.status
            await self._run.book.save(shard)
            self._counters.batches_submitted += 1
            self._counters.batches_running += 1
            return True
        raise FatalCallError(f"batches.create for batch shard {shard.id} got no answer "
                             f"{CREATE_TRIES} times; run again: the shard is looked up "
                             "before it is created again")

    async def _poll(self, shard: Shard) -> None:
        """Wait for the batch to end, backing off between looks."""
        if shard.id not in self._enqueued:  # running since an earlier run: it takes room
            lines = await self._run.book.lines(shard.id)
            self._enqueued[shard.id] = sum(self._run.worst_tokens(r) for _, r in lines)
        wait = self._config.first_poll_s
        while not self._stop.is_set():
            batch = await self._client.batches.retrieve(shard.batch_id or "")
            counts = batch.request_counts
            shard.status = batch.status
            if counts is not None:
                self._counters.lines_done += max(0, counts.completed - shard.completed)
                shard.completed, shard.failed = counts.completed, counts.failed
            if batch.status == "failed" and is_token_limited(_plain(batch.errors)):
                # refused for the account's enqueued tokens: made again once others finish;
                # its lines do not fail
                shard.state, shard.error = "uploaded", "deferred: token_limit_exceeded"
                self._enqueued.pop(shard.id, None)
                self._counters.batches_running -= 1
                self._counters.batches_submitted -= 1
                await self._run.book.save(shard)
                await self._wait(self._config.max_poll_s)
                return
            if batch.status in TERMINAL:
                self._enqueued.pop(shard.id, None)
                shard.state = "terminal"
                shard.output_file_id, shard.error_file_id = (batch.output_file_id,
                                                             batch.error_file_id)
                if batch.status == "failed":
                    shard.error = failure_of(batch.status, _plain(batch.errors))
                self._counters.batches_running -= 1
                await self._run.book.save(shard)
                return
            await self._run.book.save(shard)
            await self._wait(wait)
            wait = min(max(wait * 2, 0.01), self._config.max_poll_s)

    async def _collect(self, shard: Shard, deliver: Deliver) -> None:
        """Deliver every line's result once, as the files stream in; requeue what the batch
        did not run."""
        book = self._run.book
        pending = dict(await book.lines(shard.id))
        done = await book.collected(shard.batch_id or "")
        seen: set[str] = set()
        delivered: list[str] = []
        requeue: list[str] = []
        for file_id in (shard.output_file_id, shard.error_file_id):
            if not file_id:
                continue
            async with self._client.files.with_streaming_response.content(file_id) as raw:
                async for text in raw.iter_lines():
                    crash_point("downloading")
                    line = read_line(text)
                    if line is None or line.key not in pending or line.key in seen:
                        continue
                    seen.add(line.key)
                    if line.requeue:
                        requeue.append(line.key)
                        continue
                    if line.key not in done:
                        request = pending[line.key]
                        await deliver(self._result(shard, Call(line.key, json.loads(request),
                                                               request), line))
                        if not delivered:
                            crash_point("collecting")
                    delivered.append(line.key)
        for key, request in pending.items():
            if key in seen:
                continue
            if shard.status != "failed":
                requeue.append(key)  # in neither file: not run
            elif key not in done:  # the batch failed whole (validation): each line says why
                await deliver(self._result(shard, Call(key, json.loads(request), request), None))
                delivered.append(key)
        await book.mark(shard.id, delivered, "done")
        await book.mark(shard.id, requeue, "requeued")
        self._requeue([Call(key, json.loads(pending[key]), pending[key]) for key in requeue])
        shard.state = "collected"
        await book.save(shard)
        await book.forget_requests(shard.id)
        self._counters.batches_collected += 1

    def _result(self, shard: Shard, call: Call, line: LineResult | None) -> CallResult:
        now = utc_now()
        result = CallResult(call, now, now, 0.0, [], batch_id=shard.batch_id)
        if line is None:  # the whole batch failed (validation): every line says why
            result.error_class, result.error = "BatchError", shard.error or "the batch failed"
            return result
        result.body, result.usage, result.reply = line.body, line.usage, line.reply
        result.vector = line.vector
        result.error_class, result.error = line.error_class, line.error
        return result

    async def _wait(self, seconds: float) -> None:
        """Sleep, or less when the run stops."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that comes
        # as the stop is set
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()


def _doing(shard: Shard) -> str:
    return f"batch shard {shard.id} ({shard.state})"


def _refusal(shard: Shard, error: openai.APIStatusError) -> str:
    """Why the provider refused a step, with what to do."""
    hint = {401: "check OPENAI_API_KEY or call.api_key",
            403: "the key may not use the Batch API",
            404: "the server may have no Batch API (use executor: online)"}.get(
        error.status_code, "see the provider's message")
    return f"{_doing(shard)}: the provider refused it ({error.status_code}: {error.message}); {hint}"


def _plain(value: Any) -> Any:
    """An SDK object as the JSON it came from (the wire functions take plain values)."""
    return value.model_dump() if hasattr(value, "model_dump") else value


def _age_s(stamp: str) -> float:
    """Seconds since an ISO 8601 UTC time the store wrote."""
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 1e9
    return max(0.0, time.time() - then)
