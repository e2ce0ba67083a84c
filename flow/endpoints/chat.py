"""Chat completions on the wire: read a reply, classify an error, read usage, estimate tokens.

Pure functions of a status, headers and a body: no SDK types, no I/O. The online executor,
re-posting of stored replies and (later) batch results all read replies through these.

| what came back                                  | what it is                                   |
|-------------------------------------------------|----------------------------------------------|
| 429 rate limit                                  | `RateLimitedError`: pause the run, retry     |
| 408, 409, 5xx                                   | `RetryableError`                             |
| 200 with a body that is not a chat completion   | `RetryableError` (counts toward `max_tries`) |
| 400, 403, 404, 422 and other 4xx                | `RequestError`: the item fails at once       |
| 401, 429 `insufficient_quota`                   | `FatalCallError`: the run stops              |
| `finish_reason` `length` or `content_filter`    | `ResponseError`: the item fails, the paid reply is kept |
| `tool_calls` and no text                        | the calls, as JSON text, are what post steps get |
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from collections.abc import Mapping
from typing import Any

from flow.errors import (
    ConfigError,
    FatalCallError,
    RateLimitedError,
    RequestError,
    ResponseError,
    RetryableError,
)
from flow.keys import canonical_json
from flow.records import Reply, Usage
from flow.tokens import count_prompt_tokens, count_text_tokens

PATH = "/chat/completions"  # where requests are posted, under the client's base URL
NOT_KEPT = "flow_not_kept"
RETRY_STATUS = frozenset({408, 409})
# the openai SDK's exception names, stored as `error_class` so stores read the same as before
STATUS_NAMES = {400: "BadRequestError", 401: "AuthenticationError",
                403: "PermissionDeniedError", 404: "NotFoundError", 409: "ConflictError",
                422: "UnprocessableEntityError", 429: "RateLimitError"}


# taken as they are, without importing the SDK to read the rest (a run with nothing to send
# never loads it); every one is in `_chat_params` (tested)
COMMON_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop",
    "response_format", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs",
    "reasoning_effort", "tools", "tool_choice", "extra_body"})


@functools.cache
def _chat_params() -> frozenset[str]:
    """The parameters a chat completion request takes, as the SDK names them."""
    from openai.resources.chat.completions import AsyncCompletions
    return frozenset(inspect.signature(AsyncCompletions.create).parameters) - {
        "self", "messages", "model", "stream", "n", "extra_headers", "timeout"}


def check_params(params: Mapping[str, Any]) -> None:
    """A `ConfigError` for a param the endpoint does not take (a typo is not sent)."""
    for name in params:
        if name in COMMON_PARAMS or name in _chat_params():
            continue
        if name == "extra_headers":
            raise ConfigError("call.params.extra_headers: put headers in call.headers, which "
                              "are sent with every request but never stored nor part of a "
                              "request's key (a rotated token re-pays nothing)")
        if name == "timeout":
            raise ConfigError("call.params.timeout: set call.timeout_s instead")
        close = difflib.get_close_matches(name, sorted(_chat_params()), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"call.params.{name}: not a chat completions parameter; {hint}"
                          "a provider's own parameters go under call.params.extra_body")


CUT_SHORT = "response cut short at max_tokens (finish_reason=length)"


def parse_reply(body: str) -> tuple[Reply, dict[str, Any]]:
    """The usable text of a chat completion body, and the body as a value.

    A reply cut short at `max_tokens` is usable, and flagged (`Reply.truncated`). Raises
    `ResponseError` for a reply that was paid for but carries nothing usable (filtered,
    refused, cut short before any text) and `RetryableError` for a body that is not a chat completion.
    """
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise RetryableError(f"malformed response body: {body[:120]!r}", "ResponseError") from None
    if isinstance(value, dict) and NOT_KEPT in value:
        raise ResponseError(str(value[NOT_KEPT]))
    try:
        choice = value["choices"][0]
        message = choice["message"]
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RetryableError(f"malformed response body: {body[:120]!r}", "ResponseError") from None
    if finish == "length" and not isinstance(message.get("content") if isinstance(
            message, dict) else None, str):
        raise ResponseError(f"{CUT_SHORT} before any text; raise max_tokens and run again")
    if finish == "content_filter":
        raise ResponseError("response withheld by the provider's content filter "
                            "(finish_reason=content_filter)")
    text = message.get("content") if isinstance(message, dict) else None
    tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(text, str) and isinstance(tool_calls, list) and tool_calls \
            and isinstance(finish, str):
        # a model calling tools answers with the calls: they are the output post steps get
        return Reply(canonical_json(tool_calls), finish), value
    if not isinstance(text, str):
        refusal = message.get("refusal") if isinstance(message, dict) else None
        if refusal:
            raise ResponseError(f"the model refused: {refusal}")
        raise RetryableError(f"response has no text content: {body[:120]!r}", "ResponseError")
    if not isinstance(finish, str):
        raise RetryableError("response has no finish_reason (cut off?)", "ResponseError")
    return Reply(text, finish), value


def read_stored_reply(body: str) -> tuple[Reply | None, str | None, str | None]:
    """A stored reply read again: its usable text, or the error class and message of why not."""
    try:
        reply, _ = parse_reply(body)
    except ResponseError as e:
        return None, e.error_class, str(e)
    except RetryableError as e:
        return None, "ResponseError", f"stored reply: {e}"
    return reply, None, None


def read_usage(value: Any) -> Usage | None:
    """The tokens a parsed body reports in `usage`, or None when it reports none."""
    usage = value.get("usage") if isinstance(value, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")),
                 _count(cached))


def usage_of_body(body: str) -> Usage | None:
    """The usage of a body not yet parsed (one that is too large to keep, or unusable)."""
    try:
        return read_usage(json.loads(body))
    except (ValueError, RecursionError):
        return None


def usage_of_tail(tail: str) -> Usage | None:
    """The usage at the end of a body too large to keep whole (servers put `usage` last)."""
    at = tail.rfind('"usage"')
    colon = tail.find(":", at)
    if at < 0 or colon < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(tail[colon + 1:].lstrip())
        return read_usage({"usage": value})
    except (ValueError, RecursionError):
        return None


def not_kept_body(size: int, limit: int, usage: Usage | None) -> str:
    """What is stored in place of a paid reply too large to keep: its usage and why."""
    stub: dict[str, Any] = {NOT_KEPT: f"response of {size} bytes is larger than "
                                      f"call.max_response_bytes ({limit})"}
    if usage is not None:
        stub["usage"] = {"prompt_tokens": usage.prompt_tokens,
                         "completion_tokens": usage.completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}
    return json.dumps(stub)


def classify_status(status: int, body: Any, headers: Mapping[str, str]) -> Exception:
    """The error an HTTP error status and its JSON body (or None) stand for."""
    message = error_message(body) or f"HTTP {status}"
    name = STATUS_NAMES.get(status, "InternalServerError" if status >= 500 else "APIStatusError")
    if status == 401:
        return FatalCallError(f"the endpoint refused the API key (401): {message}. Check "
                              "OPENAI_API_KEY or call.api_key")
    if status == 429:
        if error_code(body) == "insufficient_quota":
            return FatalCallError(f"the account has no quota left (429 insufficient_quota): "
                                  f"{message}. Add credit or use another key, then run again")
        return RateLimitedError(f"rate limited (429): {message}", name, status,
                                retry_after_s(headers))
    if status in RETRY_STATUS or status >= 500:
        return RetryableError(f"{status}: {message}", name, status, retry_after_s(headers))
    return RequestError(f"{status}: {message}", name, status, error_code(body, "param"))


def error_message(body: Any) -> str | None:
    """The server's own words from an error body, if it gave any."""
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]  # a proxy's plain-text error page
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
        if isinstance(inner, str) and inner:
            return inner[:500]
    return None


def error_code(body: Any, field: str = "code") -> str | None:
    """The `code` of an OpenAI error body (`insufficient_quota`, ...), or another of its
    text fields (`param`: the part of the request at fault)."""
    inner = body.get("error", body) if isinstance(body, dict) else None
    code = inner.get(field) if isinstance(inner, dict) else None
    return code if isinstance(code, str) else None


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait a server asks for, from `retry-after-ms` or `retry-after` (seconds)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                wait = float(value) * scale
            except ValueError:
                continue
            if wait == wait and wait != float("inf"):
                return max(0.0, wait)
    return None


def estimate_prompt_tokens(request: Mapping[str, Any]) -> int:
    """Prompt tokens of a request before it is sent, with the model's tokenizer (an
    embeddings request's `input` is one text)."""
    given = request.get("messages") or request["input"]
    if isinstance(given, str):
        return count_text_tokens([given], request["model"])[0]
    return count_prompt_tokens(given, request["model"])


MAX_TOKENS = 2 ** 53  # larger counts are garbage: SQLite (and JSON readers) could not hold them


def _count(value: Any) -> int:
    return value if type(value) is int and 0 <= value < MAX_TOKENS else 0
