"""The Responses API (`POST /v1/responses`), answered as the chat completion it amounts to.

A Responses request is read as chat: `instructions` a system message, `input` the messages
(or one user message when it is text), `max_output_tokens` the cap, `text.format` the
`response_format`. The chat reply (faults, limits and latency included) is then given the
Responses shape: `output` with one message of `output_text`, `status` completed or
incomplete, `usage` in input and output tokens. The same messages get the same text through
either endpoint.
"""

from __future__ import annotations

import json
from typing import Any

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def as_chat_body(body: Any) -> Any:
    """The chat completion request a Responses request amounts to (as it is, when it is
    not one: the chat reader refuses it)."""
    if not isinstance(body, dict):
        return body
    given = body.get("input")
    messages: list[Any] = ([{"role": "user", "content": given}] if isinstance(given, str)
                           else list(given) if isinstance(given, list) else [])
    if isinstance(body.get("instructions"), str):
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    chat = {key: value for key, value in body.items()
            if key not in ("input", "instructions", "max_output_tokens", "text")}
    chat["messages"] = messages
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]
    form = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(form, dict) and form.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            key: form[key] for key in ("name", "schema", "strict") if key in form}}
    elif isinstance(form, dict) and form.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


def as_response_text(chat_text: str) -> str:
    """A chat completion body given the Responses shape; any other body as it is."""
    try:
        chat = json.loads(chat_text)
        choice = chat["choices"][0]
        message, finish = choice["message"], choice.get("finish_reason")
        usage = chat["usage"]
    except (ValueError, KeyError, IndexError, TypeError):
        return chat_text  # a broken body stays broken
    content: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str):
        content.append({"type": "output_text", "text": message["content"], "annotations": []})
    reason = INCOMPLETE.get(finish or "")
    response = {
        "id": "resp_" + chat["id"].removeprefix("chatcmpl-"),
        "object": "response",
        "created_at": chat.get("created", 0),
        "status": "incomplete" if reason else "completed",
        "incomplete_details": {"reason": reason} if reason else None,
        "model": chat.get("model"),
        "output": [{"type": "message", "id": "msg_" + chat["id"][-24:], "status":
                    "incomplete" if reason else "completed", "role": "assistant",
                    "content": content}],
        "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": usage.get("completion_tokens", 0),
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": usage.get("total_tokens", 0)},
    }
    return json.dumps(response)
