"""The shape of a re-ask: the request again, with the reply that broke the schema and what
was wrong with it appended as two messages. `reask_messages` makes one; `earlier_keys`
undoes it, so the store's readers find every reply of an exchange from its last request.
"""

from __future__ import annotations

from typing import Any

from flow.keys import content_key

REASK = ("Your reply did not match the required JSON schema: {error}. "
         "Reply again with only a JSON object that matches the schema.")


def reask_messages(request: dict[str, Any], reply_text: str, error: str) -> dict[str, Any]:
    """The request again, with the invalid reply and what was wrong with it appended."""
    key = _messages_key(request)
    messages = [*request[key], {"role": "assistant", "content": reply_text},
                {"role": "user", "content": REASK.format(error=error)}]
    return {**request, key: messages}


def earlier_keys(request: dict[str, Any], first_key: str) -> list[str]:
    """The keys of the requests asked before `request` in its exchange, first to last, from
    the item's own (`first_key`) on; just that one when `request` is no re-ask of it."""
    key = _messages_key(request)
    messages = request.get(key)
    keys: list[str] = []
    while isinstance(messages, list) and len(messages) >= 2:
        messages = messages[:-2]
        keys.append(content_key({**request, key: messages}))
        if keys[-1] == first_key:
            return keys[::-1]
    return [first_key]


def _messages_key(request: dict[str, Any]) -> str:
    return "input" if "input" in request else "messages"  # the Responses API's, or chat's
