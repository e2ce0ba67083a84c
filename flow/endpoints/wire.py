"""The endpoint seam: which request shape, path and reply reader a stage uses.

`call.endpoint` names one: `chat` (chat completions), `responses` (the Responses API) or
`embeddings` (many inputs a request, a vector each). Each has its own pure functions
(`endpoints/chat.py`, `endpoints/responses.py`, `endpoints/embeddings.py`); a stored
reply says which it is by its `object`, so re-posting it needs no config. No SDK here: the
read commands import this module and start without loading the openai package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flow.endpoints import chat, embeddings, responses
from flow.errors import ResponseError, RetryableError
from flow.records import Reply, Usage


@dataclass(frozen=True)
class Endpoint:
    """One endpoint's wire functions."""

    name: str
    list_key: str  # where the rendered messages go: `messages` or `input`
    check_params: Callable[[Mapping[str, Any]], None]
    parse_reply: Callable[[str], tuple[Reply, dict[str, Any]]]
    read_usage: Callable[[Any], Usage | None]

    @property
    def path(self) -> str:
        """Where its requests are posted, under the client's base URL."""
        return {"responses": "/responses", "embeddings": embeddings.PATH}.get(
            self.name, chat.PATH)


ENDPOINTS = {
    "chat": Endpoint("chat", "messages", chat.check_params, chat.parse_reply, chat.read_usage),
    "responses": Endpoint("responses", "input", responses.check_params,
                          responses.parse_reply, responses.read_usage),
    "embeddings": Endpoint("embeddings", "input", embeddings.check_params,
                           embeddings.parse_reply, embeddings.read_usage),
}


def endpoint_named(name: str) -> Endpoint:
    """The endpoint `call.endpoint` names."""
    return ENDPOINTS[name]


def endpoint_of(value: Any) -> Endpoint:
    """The endpoint a parsed reply came from, by its `object`."""
    if embeddings.is_item_body(value):
        return ENDPOINTS["embeddings"]
    return ENDPOINTS["responses" if responses.is_response(value) else "chat"]


def read_stored_reply(body: str) -> tuple[Reply | None, str | None, str | None]:
    """A stored reply of any endpoint read again: its usable text, or why not."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    try:
        reply, _ = endpoint_of(value).parse_reply(body)
    except ResponseError as e:
        return None, e.error_class, str(e)
    except RetryableError as e:
        return None, "ResponseError", f"stored reply: {e}"
    return reply, None, None


def usage_of_body(body: str) -> Usage | None:
    """The usage of a body of either endpoint not yet parsed."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return endpoint_of(value).read_usage(value)
