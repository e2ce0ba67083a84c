"""The Batch API's files as plain values: a shard's input lines, and what one output or
error line says. Pure functions: no SDK types, no I/O.

A line's request is the exact request the online path would send, keyed by its content key
(`custom_id`), so a reply that comes through a batch satisfies an online run and the other
way round; its body goes through `endpoints.chat` like any reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flow.endpoints import embeddings
from flow.endpoints.chat import classify_status, error_code, error_message
from flow.endpoints.wire import endpoint_of
from flow.errors import ItemError, ResponseError, RetryableError
from flow.records import Reply, Usage

REQUEUED_CODES = ("batch_expired", "batch_cancelled")  # not done: no attempt used
EMBEDDINGS_URL = "/v1/embeddings"


def input_line(key: str, request_json: str, url: str) -> str:
    """One line of a batch's input file: the request under its content key (an embeddings
    item's asks for its one input in base64, as a packed request does)."""
    if url == EMBEDDINGS_URL:
        request_json = embeddings.packed_request([json.loads(request_json)])[1]
    return (f'{{"custom_id":{json.dumps(key)},"method":"POST","url":{json.dumps(url)},'
            f'"body":{request_json}}}')


@dataclass(slots=True)
class LineResult:
    """What a batch said of one request: its paid body (usable or not), an error, or that
    it was not done (expired, cancelled: `requeue`)."""

    key: str
    body: str | None = None
    usage: Usage | None = None
    reply: Reply | None = None
    error_class: str | None = None
    error: str | None = None
    requeue: bool = False
    vector: bytes | None = None  # an embeddings line's, as float32 bytes


def read_line(text: str) -> LineResult | None:
    """An output or error file's line; None when it is not a line of either (blank, garbage
    without a `custom_id`: nothing can be joined to it)."""
    try:
        line = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    result = LineResult(line["custom_id"])
    error, response = line.get("error"), line.get("response")
    if isinstance(error, dict) and not isinstance(response, dict):
        code = str(error.get("code") or "")
        result.requeue = code in REQUEUED_CODES
        result.error_class = "BatchError"
        result.error = f"the batch did not run it ({code or 'no code'}): " \
                       f"{error.get('message') or ''}".strip()
        return result
    if not isinstance(response, dict):
        result.error_class, result.error = "ResponseError", "a batch line with no response"
        return result
    status = response.get("status_code")
    body: Any = response.get("body")
    if status != 200:
        fault = classify_status(status if isinstance(status, int) else 500, body, {})
        result.error_class = getattr(fault, "error_class", type(fault).__name__)
        result.error = f"in the batch: {fault}"
        return result
    result.body = json.dumps(body, ensure_ascii=False)
    if isinstance(body, dict) and body.get("object") == "list":
        return _embedding(result)
    endpoint = endpoint_of(body)  # chat's or the Responses API's reply
    result.usage = endpoint.read_usage(body)
    try:
        result.reply, _ = endpoint.parse_reply(result.body)
    except (ItemError, RetryableError) as e:
        # paid and kept, but unusable: the item fails with why
        result.error_class = e.error_class if isinstance(e, ResponseError) else "ResponseError"
        result.error = str(e)
    return result


def _embedding(result: LineResult) -> LineResult:
    """An embeddings line's reply (one input): its vector, and the item's body as the
    online path stores it."""
    assert result.body is not None
    try:
        (vector,), usage = embeddings.parse_packed(result.body, 1)
    except RetryableError as e:
        result.usage = embeddings.read_usage(json.loads(result.body))
        result.error_class, result.error = "ResponseError", str(e)
        return result
    dimensions, tokens = len(vector) // 4, usage.prompt_tokens if usage else 0
    result.body = embeddings.item_body(str(json.loads(result.body).get("model")), dimensions,
                                       tokens, result.key, 0, 1)
    result.usage, result.vector = usage, vector
    result.reply = Reply(embeddings.output_text(dimensions), "stop")
    return result


def failure_of(status: str, errors: Any) -> str:
    """Why a batch as a whole did not run, in words: its status and the errors it lists."""
    found = []
    data = errors.get("data") if isinstance(errors, dict) else errors
    for error in data if isinstance(data, list) else []:
        if isinstance(error, dict):
            where = f" (line {error['line']})" if error.get("line") is not None else ""
            found.append(f"{error_code(error) or error.get('code') or 'error'}{where}: "
                         f"{error_message(error) or error.get('message') or ''}".strip())
    return f"the batch {status}" + (": " + "; ".join(found[:5]) if found else "")


def is_token_limited(errors: Any) -> bool:
    """A create refused because the account's enqueued tokens would pass its limit."""
    data = errors.get("data") if isinstance(errors, dict) else errors
    return any(isinstance(e, dict) and e.get("code") == "token_limit_exceeded"
               for e in (data if isinstance(data, list) else []))
