"""The Responses API (`/v1/responses`) on the wire: its params, its reply, its usage.

Pure functions, as `chat` is for chat completions. A request carries the rendered messages
as `input` (role and content, the same list chat sends as `messages`); a structured output
is asked for under `text.format`. A reply's text is its `output_text` parts joined; a reply
`incomplete` for `max_output_tokens` is cut short (usable, flagged), one for
`content_filter` withheld. Errors are classified as chat's are (the same HTTP statuses).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from collections.abc import Mapping
from typing import Any

from flow.endpoints.chat import NOT_KEPT, _count
from flow.errors import ConfigError, ResponseError, RetryableError
from flow.records import Reply, Usage

CUT_SHORT = "response cut short at max_output_tokens (status incomplete)"


# taken as they are, without importing the SDK to read the rest; every one is in
# `_responses_params` (tested)
COMMON_PARAMS = frozenset({
    "temperature", "top_p", "max_output_tokens", "text", "reasoning", "instructions",
    "tools", "tool_choice", "extra_body"})


@functools.cache
def _responses_params() -> frozenset[str]:
    """The parameters a Responses request takes, as the SDK names them."""
    from openai.resources.responses import AsyncResponses
    return frozenset(inspect.signature(AsyncResponses.create).parameters) - {
        "self", "input", "model", "stream", "extra_headers", "timeout", "background",
        "conversation", "previous_response_id"}


def check_params(params: Mapping[str, Any]) -> None:
    """A `ConfigError` for a param the Responses API does not take (or flow cannot keep:
    a conversation held by the server has no content key)."""
    for name in params:
        if name in COMMON_PARAMS or name in _responses_params():
            continue
        if name == "max_tokens":
            raise ConfigError("call.params.max_tokens: the Responses API names it "
                              "max_output_tokens")
        if name == "response_format":
            raise ConfigError("call.params.response_format: the Responses API takes it as "
                              "text: {format: ...}; or set call.schema")
        close = difflib.get_close_matches(name, sorted(_responses_params()), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"call.params.{name}: not a Responses API parameter "
                          f"(call.endpoint: responses); {hint}a provider's own parameters go "
                          "under call.params.extra_body")


def structured_output(name: str, schema: dict[str, Any], strict: bool) -> dict[str, Any]:
    """The `text` param that asks for output matching `schema`."""
    return {"format": {"type": "json_schema", "name": name, "schema": schema,
                       "strict": strict}}


def is_response(value: Any) -> bool:
    """Whether a parsed body is a Responses API reply."""
    return isinstance(value, dict) and value.get("object") == "response"


def parse_reply(body: str) -> tuple[Reply, dict[str, Any]]:
    """The usable text of a Responses body, and the body as a value; raises as
    `chat.parse_reply` does."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise RetryableError(f"malformed response body: {body[:120]!r}", "ResponseError") from None
    if isinstance(value, dict) and NOT_KEPT in value:
        raise ResponseError(str(value[NOT_KEPT]))
    if not is_response(value) or not isinstance(value.get("output"), list):
        raise RetryableError(f"malformed response body: {body[:120]!r}", "ResponseError")
    status = value.get("status")
    reason = (value.get("incomplete_details") or {}).get("reason")
    texts, refusal = [], None
    for item in value["output"]:
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        for part in item.get("content") or []:
            if isinstance(part, dict) and part.get("type") == "output_text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") == "refusal":
                refusal = part.get("refusal")
    if status == "incomplete" and reason == "content_filter":
        raise ResponseError("response withheld by the provider's content filter "
                            "(incomplete: content_filter)")
    cut = status == "incomplete" and reason == "max_output_tokens"
    if not texts:
        if refusal:
            raise ResponseError(f"the model refused: {refusal}")
        if cut:
            raise ResponseError(f"{CUT_SHORT} before any text; raise max_output_tokens and "
                                "run again")
        raise RetryableError(f"response has no text output: {body[:120]!r}", "ResponseError")
    if status not in ("completed", "incomplete"):
        raise RetryableError(f"response status is {status!r}, not completed", "ResponseError")
    return Reply("".join(texts), "length" if cut else "stop"), value


def read_usage(value: Any) -> Usage | None:
    """The tokens a Responses body reports, or None when it reports none."""
    usage = value.get("usage") if isinstance(value, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")),
                 _count(cached))
