"""The request an item becomes, and the content key that names it.

Templates render in Jinja2's sandbox with strict undefined names, so a missing field fails
the item with its name, and a template cannot reach Python internals. A request's key is a
tagged hash of its canonical JSON: the same model, messages and params give the same key,
which is how a re-run knows what is already done.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from flow.config import CallConfig
from flow.errors import ConfigError, TemplateError

HASH_PREFIX = "sha256:"
MAX_RENDERED_CHARS = 4_000_000


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: one text for one value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_key(value: Any) -> str:
    """A tagged SHA-256 of the canonical JSON of `value`."""
    return key_of_json(canonical_json(value))


def key_of_json(text: str) -> str:
    """The content key of a value already in canonical JSON."""
    return HASH_PREFIX + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class RequestBuilder:
    """Renders the configured messages over an item's fields into a chat completion request."""

    def __init__(self, call: CallConfig) -> None:
        env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                   keep_trailing_newline=True)
        self._model = call.model
        self._params = dict(call.params)
        self._parts: list[tuple[str, str | jinja2.Template]] = []
        for index, message in enumerate(call.messages):
            if "{{" not in message.content and "{%" not in message.content:
                self._parts.append((message.role, message.content))
                continue
            try:
                template = env.from_string(message.content)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(
                    f"call.messages[{index}].content: invalid template at line {e.lineno}: "
                    f"{e.message}") from None
            self._parts.append((message.role, template))

    def build(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """The request for one item; `where` names the item in errors ("row 7")."""
        messages = []
        for index, (role, part) in enumerate(self._parts):
            content = part if isinstance(part, str) else self._render(part, fields, index, where)
            messages.append({"role": role, "content": content})
        return {"model": self._model, "messages": messages, **self._params}

    @staticmethod
    def _render(template: jinja2.Template, fields: dict[str, Any], index: int, where: str) -> str:
        try:
            text = template.render(fields)
        except jinja2.UndefinedError as e:
            raise TemplateError(
                f"{where}: call.messages[{index}].content: {_undefined_reason(e)}") from None
        except Exception as e:  # a sandbox refusal or a filter failing on this row's data
            raise TemplateError(
                f"{where}: call.messages[{index}].content: {type(e).__name__}: {e}") from None
        if len(text) > MAX_RENDERED_CHARS:
            raise TemplateError(f"{where}: call.messages[{index}].content renders to "
                                f"{len(text)} characters, more than {MAX_RENDERED_CHARS}")
        return text


def _undefined_reason(error: jinja2.UndefinedError) -> str:
    message = str(error.message or error)
    if message.endswith("is undefined") and message.startswith("'"):
        return f"missing template field {message.split(chr(39))[1]!r}"
    return message
