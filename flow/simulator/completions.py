"""What a chat completion request gets: a 200 body or an error, from the body and a fault.

Both ways in use these pure functions: `POST /v1/chat/completions` (`server`), which checks
its limits between `draft_reply` and `finish_reply`, and each line of a batch (`batches`),
which calls `answer`. No I/O and no clock: the caller says when the reply was `created`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from flow.keys import content_key
from flow.simulator.replies import compose_reply
from flow.simulator.schemas import SchemaError
from flow.tokens import count_prompt_tokens

MARKER = re.compile(
    r"\[sim:(?:(status|finish)=([\w-]+)|(malformed|drop|hang|cut|huge|drip|garbage|half|echo))"
    r"(?:\*(\d+))?\]")
HUGE_BYTES = 20_000_000
# faults of the connection rather than of the body: the server acts them out itself
TRANSPORT_FAULTS = frozenset({"drop", "hang", "garbage", "cut", "drip"})


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request body that has the messages and model it needs."""

    body: dict[str, Any]
    messages: list[Any]
    model: str

    @property
    def text(self) -> str:
        """Every message's content, one after another: where markers are looked for."""
        return "\n".join(str(m.get("content", "")) for m in self.messages
                         if isinstance(m, dict))


@dataclass(frozen=True)
class Draft:
    """The reply before any fault is applied, and what it costs."""

    reply: str
    prompt_tokens: int
    completion_tokens: int
    finish: str | None


@dataclass(frozen=True)
class Reply:
    """A status, the body text as sent, extra headers, and the tokens it used (0 if none)."""

    status: int
    text: str
    headers: dict[str, str] = field(default_factory=dict)
    tokens: int = 0


def read_request(body: Any) -> ChatRequest | None:
    """The request in a parsed JSON body, or None when it is not a chat completion request."""
    try:
        messages = body["messages"]
        model = str(body["model"])
        if not isinstance(messages, list) or not messages or not isinstance(body, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return None
    return ChatRequest(body, messages, model)


def invalid_body() -> Reply:
    """The 400 for a body that is not a chat completion request."""
    return error_reply(400, "invalid_request_error", "invalid_body",
                       "The request body is not a valid chat completion request.")


def read_marker(text: str, arrivals: int) -> str | None:
    """The fault a prompt asks for, if it still applies to this arrival of the request."""
    if "[sim:" not in text:
        return None
    match = MARKER.search(text)
    if match is None:
        return None
    kind, value, bare, times = match.groups()
    if times is not None and arrivals > int(times):
        return None
    return bare if bare else f"{kind}={value}"


def draft_reply(request: ChatRequest, broken: bool = False) -> Draft | Reply:
    """The reply and its token counts, or a 400 for a `json_schema` no value can be made for;
    `broken`: a reply that breaks the schema."""
    prompt_tokens = count_prompt_tokens(request.messages, request.model)
    try:
        reply, completion_tokens, finish = compose_reply(request.body, request.messages,
                                                         request.model, broken)
    except SchemaError as e:
        return error_reply(400, "invalid_request_error", "invalid_json_schema",
                           f"Invalid schema for response_format: {e}")
    return Draft(reply, prompt_tokens, completion_tokens, finish)


def finish_reply(request: ChatRequest, draft: Draft, fault: str | None, *, created: int,
                 credentials: str = "", rate_headers: bool = True) -> Reply:
    """The draft with `fault` applied: an error for `status=...`, else the 200 body."""
    if fault and fault.startswith("status="):
        return status_fault(fault.removeprefix("status="), credentials, rate_headers)
    reply, finish = draft.reply, draft.finish
    if fault and fault.startswith("finish="):
        finish = fault.removeprefix("finish=")
        finish = None if finish == "none" else finish
    if fault == "huge":
        reply = "x" * HUGE_BYTES
    if fault == "half":
        reply = '{"text": "half \ud83d an emoji"}'  # half a character, as JSON text
    if fault == "echo":
        reply = f"{reply} You sent: {credentials}"
    tokens = draft.prompt_tokens + draft.completion_tokens
    if fault == "malformed":
        return Reply(200, '{"id": "chatcmpl-broken", "choices": [{"mess', tokens=tokens)
    body, messages = request.body, request.messages
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                              "message": {"role": "assistant", "content": reply,
                                          "refusal": None}}
    if finish == "tool_calls" or (body.get("tools") and finish == "stop"):
        choice.update(finish_reason="tool_calls", message=_tool_call(
            body.get("tools"), messages, digest=content_key(body)[7:15]))
    payload = {
        "id": "chatcmpl-" + content_key(body)[7:31],
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [choice],
        "usage": {"prompt_tokens": draft.prompt_tokens,
                  "completion_tokens": draft.completion_tokens, "total_tokens": tokens,
                  "prompt_tokens_details": {"cached_tokens": 0}},
        "system_fingerprint": "fp_flow_simulator",
    }
    return Reply(200, json.dumps(payload), tokens=tokens)


def answer(request: ChatRequest, fault: str | None, *, created: int,
           broken: bool = False) -> Reply:
    """The whole answer to a request, with no limits or latency: what a batch line gets."""
    draft = draft_reply(request, broken)
    if isinstance(draft, Reply):
        return draft
    return finish_reply(request, draft, fault, created=created)


def status_fault(code: str, credentials: str, rate_headers: bool) -> Reply:
    """The error a `[sim:status=...]` marker asks for."""
    if code.endswith("-echo"):
        # a careless gateway: the caller's own header, quoted at the end of a long message
        return error_reply(int(code.split("-")[0]), "invalid_request_error", None,
                           "The request was refused. " * 18 + f"You sent: {credentials}")
    if code == "429-day" or (code.startswith("429-") and code[4:].isdigit()):
        daily = code == "429-day"
        reply = error_reply(429, "requests", "rate_limit_exceeded",
                            f"Rate limit reached for requests{' per day' * daily}.")
        reply.headers["retry-after"] = "86400" if daily else code[4:]
        return reply
    if code == "429-quota":
        return error_reply(429, "insufficient_quota", "insufficient_quota",
                           "You exceeded your current quota, please check your plan.")
    status = int(code) if code.isdigit() else 500
    if status == 429:
        reply = error_reply(429, "requests", "rate_limit_exceeded",
                            "Rate limit reached (injected).")
        if rate_headers:
            reply.headers["retry-after-ms"] = "50"
        return reply
    kinds = {400: "invalid_request_error", 401: "invalid_request_error",
             403: "permission_error", 404: "invalid_request_error"}
    return error_reply(status, kinds.get(status, "server_error"), None,
                       f"Simulated error {status}.")


def error_reply(status: int, kind: str, code: str | None, message: str,
                param: str | None = None) -> Reply:
    """An error in OpenAI's shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Reply(status, json.dumps(body))


def _tool_call(tools: Any, messages: list[Any], digest: str) -> dict[str, Any]:
    """The message of a model that calls the first tool it was given, as OpenAI sends it."""
    first = tools[0] if isinstance(tools, list) and tools else {}
    name = (first.get("function") or {}).get("name", "lookup") if isinstance(first, dict) \
        else "lookup"
    user = next((str(m.get("content", "")) for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), "")
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": f"call_{digest}", "type": "function",
         "function": {"name": name, "arguments": json.dumps({"query": user[:200]})}}]}
