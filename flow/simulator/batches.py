"""OpenAI's Batch API over the simulator's chat completions, on a simulated clock.

`POST /v1/batches` (`input_file_id` of a file uploaded with purpose `batch`, `endpoint`
`/v1/chat/completions`, `completion_window` `24h`, `metadata`), `GET /v1/batches/{id}`,
`GET /v1/batches` (newest first; `limit`, `after`), `POST /v1/batches/{id}/cancel`; the input,
output and error files are served by `files`.

A batch is `validating` in the answer to its create. From then on its state is worked out
whenever it is read, from the simulated clock (`clock`): its lines are done one after another
over `batch_s` seconds (`in_progress`, `request_counts` growing), then it is `completed` with an
output file (lines answered 200) and an error file (the others), each made only if it has a
line. Lines are done in a shuffled order (seeded by `seed` and the create's number;
`batch_shuffle=False` keeps input order), so output files are not in input order. A batch not
done 24 hours after its create `expired`; one cancelled is `cancelling` in the answer to the
cancel and `cancelled` after, with the lines done so far. Lines never run are in the error
file as `batch_expired` or `batch_cancelled`. An invalid input file (`batch_lines`) makes the
batch `failed`, with every bad line in `errors`.

Each line is answered exactly as `POST /v1/chat/completions` would answer its body
(`completions`), markers included: `[sim:status=400]` puts the line in the error file with
that error; connection faults (`drop`, `hang`, `cut`, ...) and `malformed` make it a 500 there.
Rate limits, latency, outages and the random fault rates do not apply to batch lines. Lines
count in `SimulatorStats.by_request`, `by_model`, `tokens` and `batch_lines` when they are done.

`SimulatorConfig.batch_faults` maps a create's number (1: the first create to arrive) to:
`expire:N` (N lines done, then expired at `batch_s`), `cancel:N` (cancelled once N lines are
done), `fail-validation` or `fail-validation:L` (failed, line L, default 1, in `errors`),
`token-limit` (failed with `token_limit_exceeded`) and `drop-create` (the batch is made and
runs, but the connection closes before the create is answered). `batch_token_limit` fails a
create the same way when the tokens enqueued for its model (prompt tokens and `max_tokens` of
every line of the batches not finished) would pass it.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from flow.keys import content_key
from flow.simulator.batch_lines import (
    RESPONSES,
    Line,
    invalid_params,
    jsonl,
    read_lines,
    result_line,
    undone_line,
)
from flow.simulator.clock import Clock
from flow.simulator.completions import (
    TRANSPORT_FAULTS,
    Reply,
    answer,
    error_reply,
    invalid_body,
    read_marker,
)
from flow.simulator.config import SimulatorConfig, SimulatorStats, check_batch_fault
from flow.simulator.embeddings import EmbeddingsRequest, embed
from flow.simulator.files import Files, page_of, send_error
from flow.simulator.replies import breaks_schema
from flow.simulator.responses import as_response_text

WINDOW_S = 24 * 3600.0
DEFAULT_TOKEN_LIMIT = 2_000_000  # what the `token-limit` fault quotes with no limit set
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(frozen=True)
class Stop:
    """How a batch ends: when, in which status, with how many lines done."""

    at: float
    status: str
    done: int


@dataclass
class Batch:
    """One batch: what it was created with, and what has become of it."""

    id: str
    number: int  # the order of its create among all creates
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created: float  # on the simulated clock
    lines: list[Line]
    order: list[int]  # the lines' indexes in the order they are done
    fault: str | None
    errors: list[dict[str, Any]]
    status: str = "validating"
    cancel_at: float | None = None
    stop: Stop | None = None
    results: list[dict[str, Any]] = field(default_factory=list)  # done lines, in order
    output_file_id: str | None = None
    error_file_id: str | None = None
    enqueued_tokens: int = 0  # counted only when `batch_token_limit` is set

    @property
    def model(self) -> str | None:
        """The model its lines ask for."""
        return next((line.model for line in self.lines if line.model), None)

    def limit(self) -> int:
        """The most lines it will do: all, or N for `expire:N` and `cancel:N`."""
        kind, _, count = (self.fault or "").partition(":")
        return min(int(count), len(self.lines)) if kind in ("expire", "cancel") \
            else len(self.lines)


class Batches:
    """The batches created, by id, and the handlers that serve them."""

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats, clock: Clock,
                 files: Files) -> None:
        for fault in config.batch_faults.values():
            check_batch_fault(fault)
        self._config = config
        self._stats = stats
        self._clock = clock
        self._files = files
        self._batches: dict[str, Batch] = {}
        self._creates = 0

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Serve `/v1/batches`."""
        router.add_post("/v1/batches", self.create)
        router.add_get("/v1/batches", self.list)
        router.add_get("/v1/batches/{batch_id}", self.retrieve)
        router.add_post("/v1/batches/{batch_id}/cancel", self.cancel)

    def refresh(self) -> None:
        """Bring every batch up to the simulated clock."""
        for batch in self._batches.values():
            self._update(batch)

    async def create(self, request: web.Request) -> web.Response:
        """`POST /v1/batches`."""
        self._creates += 1
        number = self._creates
        fault = self._config.batch_faults.get(number)
        try:
            params = await request.json()
        except ValueError:
            params = None
        if not isinstance(params, dict):
            return send_error(400, "The body is not a JSON object.")
        problem = invalid_params(params)
        if problem is not None:
            return send_error(400, *problem)
        input_file = self._files.get(params["input_file_id"])
        if input_file is None or input_file.purpose != "batch":
            return send_error(400, f"Invalid 'input_file_id': no File object "
                              f"{params['input_file_id']} with purpose 'batch'.",
                              "input_file_id")
        lines, errors = read_lines(input_file.data, params["endpoint"])
        if not errors and fault and fault.startswith("fail-validation"):
            errors = [{"code": "invalid_request", "message": "This line is not valid "
                       "(simulated: batch fault fail-validation).", "param": "body",
                       "line": int(fault.partition(":")[2] or 1)}]
        order = list(range(len(lines)))
        if self._config.batch_shuffle:
            random.Random(f"{self._config.seed}:{number}").shuffle(order)
        batch = Batch("batch_" + secrets.token_hex(16), number, input_file.id,
                      params["endpoint"], params["completion_window"], params.get("metadata"),
                      self._clock.now(), lines, order, fault, errors)
        if not errors and (fault == "token-limit" or self._is_over_token_limit(batch)):
            limit = self._config.batch_token_limit or DEFAULT_TOKEN_LIMIT
            batch.errors = [{"code": "token_limit_exceeded", "param": None, "line": None,
                             "message": f"Enqueued token limit reached for {batch.model} in "
                             f"organization org-simulator. Limit: {limit:,} enqueued tokens. "
                             "Please try again once some in_progress batches have been "
                             "completed."}]
        self._batches[batch.id] = batch
        shard = (batch.metadata or {}).get("shard")
        self._stats.batch_creates[shard if shard is not None else batch.input_file_id] += 1
        body = self._as_json(batch)
        if fault == "drop-create":
            # made, and runs; only the answer is lost, as when a connection drops
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return web.json_response(body)

    async def retrieve(self, request: web.Request) -> web.Response:
        """`GET /v1/batches/{id}`."""
        batch = self._batches.get(request.match_info["batch_id"])
        if batch is None:
            return _no_such_batch(request.match_info["batch_id"])
        self._update(batch)
        return web.json_response(self._as_json(batch))

    async def list(self, request: web.Request) -> web.Response:
        """`GET /v1/batches`: newest first, a page of `limit` (default 20) after `after`."""
        self.refresh()
        batches = [self._as_json(b) for b in reversed(self._batches.values())]
        return page_of(batches, request, default_limit=20, max_limit=100)

    async def cancel(self, request: web.Request) -> web.Response:
        """`POST /v1/batches/{id}/cancel`: `cancelling` now, `cancelled` when read again."""
        batch = self._batches.get(request.match_info["batch_id"])
        if batch is None:
            return _no_such_batch(request.match_info["batch_id"])
        self._update(batch)
        if batch.status == "cancelled":
            return web.json_response(self._as_json(batch))
        if batch.status not in UNFINISHED:
            return send_error(400, f"Cannot cancel a batch with status '{batch.status}'.")
        batch.cancel_at = self._clock.now()
        self._update(batch)
        body = self._as_json(batch)
        body.update(status="cancelling", cancelled_at=None, output_file_id=None,
                    error_file_id=None)
        return web.json_response(body)

    def _update(self, batch: Batch) -> None:
        """Work out the batch's state at the simulated clock's now, doing the lines now due."""
        if batch.stop is not None or batch.status == "failed":
            return
        if batch.errors:
            batch.status = "failed"
            return
        now = self._clock.now()
        stop = self._stop(batch)
        self._do_lines(batch, stop.done if now >= stop.at else self._progress(batch, now))
        if now < stop.at:
            batch.status = "in_progress"
            return
        batch.status, batch.stop = stop.status, stop
        done = [r for r in batch.results if r["response"]["status_code"] == 200]
        failed = [r for r in batch.results if r["response"]["status_code"] != 200]
        code = "batch_expired" if stop.status == "expired" else "batch_cancelled"
        failed += [undone_line(batch.lines[i], code) for i in batch.order[len(batch.results):]]
        if done:
            batch.output_file_id = self._files.add(
                jsonl(done), f"{batch.id}_output.jsonl", "batch_output").id
        if failed:
            batch.error_file_id = self._files.add(
                jsonl(failed), f"{batch.id}_error.jsonl", "batch_output").id

    def _stop(self, batch: Batch) -> Stop:
        """How the batch ends: the first of completion, expiry and cancellation."""
        total, start, span = len(batch.lines), batch.created, self._config.batch_s
        end = start + span
        kind = (batch.fault or "").partition(":")[0]
        stops = [Stop(end, "expired" if kind == "expire" else "completed", batch.limit())]
        if start + WINDOW_S < end:
            stops.append(Stop(start + WINDOW_S, "expired",
                              self._progress(batch, start + WINDOW_S)))
        if kind == "cancel":
            at = start + span * batch.limit() / total if total else start
            stops.append(Stop(at, "cancelled", batch.limit()))
        if batch.cancel_at is not None:
            stops.append(Stop(batch.cancel_at, "cancelled",
                              self._progress(batch, batch.cancel_at)))
        return min(stops, key=lambda stop: stop.at)

    def _progress(self, batch: Batch, at: float) -> int:
        """How many lines are done at `at`, if the batch has not ended by then."""
        span, total = self._config.batch_s, len(batch.lines)
        done = total if span <= 0 else math.floor(total * (at - batch.created) / span)
        return max(0, min(done, batch.limit()))

    def _do_lines(self, batch: Batch, count: int) -> None:
        """Answer the batch's next lines until `count` are done."""
        total, span = len(batch.lines), self._config.batch_s
        while len(batch.results) < count:
            index = len(batch.results)
            at = batch.created + span * (index + 1) / total
            line = batch.lines[batch.order[index]]
            reply = self._answer_line(line, at)
            if batch.endpoint == RESPONSES and reply.status == 200:
                reply = replace(reply, text=as_response_text(reply.text))
            batch.results.append(result_line(line, reply))

    def _answer_line(self, line: Line, at: float) -> Reply:
        """What `POST /v1/chat/completions` would answer the line's body, markers and all."""
        self._stats.batch_lines += 1
        if line.embeddings is not None:
            return self._embed_line(line.embeddings)
        chat = line.request
        if chat is None:
            return invalid_body()
        request_key = content_key(chat.body)
        self._stats.by_request[request_key] += 1
        self._stats.by_model[chat.model] += 1
        fault = read_marker(chat.text, self._stats.by_request[request_key])
        if fault in TRANSPORT_FAULTS or fault == "malformed":
            return error_reply(500, "server_error", None, "The server had an error while "
                               "processing your request. Sorry about that!")
        broken = breaks_schema(chat.body, chat.messages, self._config.schema_break_rate,
                               self._config.schema_rebreak_rate)
        self._stats.schema_broken += broken
        reply = answer(chat, fault, created=self._clock.epoch(at), broken=broken)
        self._stats.tokens += reply.tokens
        return reply

    def _embed_line(self, asked: EmbeddingsRequest | Reply) -> Reply:
        """What `POST /v1/embeddings` would answer an embeddings line."""
        if isinstance(asked, Reply):
            return asked
        key = content_key([asked.model, asked.inputs, asked.dimensions, asked.base64])
        self._stats.by_request[key] += 1
        self._stats.by_model[asked.model] += 1
        self._stats.embedded_inputs += len(asked.inputs)
        reply = embed(asked, self._stats.by_request[key])
        self._stats.tokens += reply.tokens
        return reply

    def _is_over_token_limit(self, batch: Batch) -> bool:
        """Whether enqueuing the batch would pass `batch_token_limit` for its model."""
        limit = self._config.batch_token_limit
        if limit is None:
            return False
        self.refresh()
        batch.enqueued_tokens = sum(line.enqueued_tokens() for line in batch.lines)
        enqueued = sum(other.enqueued_tokens for other in self._batches.values()
                       if other.status in UNFINISHED and other.model == batch.model)
        return enqueued + batch.enqueued_tokens > limit

    def _as_json(self, batch: Batch) -> dict[str, Any]:
        """The Batch object, as `GET /v1/batches/{id}` answers it."""
        status, stop, epoch = batch.status, batch.stop, self._clock.epoch

        def at(when: float | None, *statuses: str) -> int | None:
            return epoch(when) if when is not None and status in statuses else None

        ended = stop.at if stop else None
        ok = [r for r in batch.results if r["response"]["status_code"] == 200]
        usage = [r["response"]["body"].get("usage") or {} for r in ok]
        input_tokens = sum(u.get("prompt_tokens", 0) for u in usage)
        output_tokens = sum(u.get("completion_tokens", 0) for u in usage)
        return {
            "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
            "model": batch.model,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window, "status": status,
            "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
            "created_at": epoch(batch.created),
            "in_progress_at": None if status in ("validating", "failed") else epoch(
                batch.created),
            "expires_at": epoch(batch.created + WINDOW_S),
            "finalizing_at": at(ended, "completed"), "completed_at": at(ended, "completed"),
            "failed_at": at(batch.created, "failed"), "expired_at": at(ended, "expired"),
            "cancelling_at": at(ended, "cancelled"), "cancelled_at": at(ended, "cancelled"),
            "request_counts": {"total": 0 if batch.errors else len(batch.lines),
                               "completed": len(ok),
                               "failed": len(batch.results) - len(ok)},
            "metadata": batch.metadata,
            "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input_tokens + output_tokens},
        }


def _no_such_batch(batch_id: str) -> web.Response:
    return send_error(404, f"No such Batch object: {batch_id}", "id")
