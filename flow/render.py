"""The request an item becomes: its messages rendered from the row's fields.

Templates render in Jinja2's sandbox with strict undefined names, so a missing field fails
the item with its name, and a template cannot reach Python internals. The canonical JSON of
the request is built alongside it, ready to be keyed (`flow.keys`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from flow.bounded import OutOfTime, Stopped, bounded
from flow.config import CallConfig
from flow.endpoints.embeddings import item_request
from flow.endpoints.wire import endpoint_named
from flow.errors import ConfigError, TemplateError
from flow.keys import canonical_json

MAX_RENDERED_CHARS = 4_000_000
JINJA_LITERALS = frozenset({"true", "false", "none"})
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class RequestBuilder:
    """Renders the configured messages over an item's fields into a chat completion request."""

    def __init__(self, call: CallConfig, where: str = "", timeout_s: float = 10,
                 key: str = "call") -> None:
        """`where` (the pipeline file) begins every configuration error; `timeout_s` bounds
        the rendering of one message; `key` is where the call is in the file (`stages[1]`)."""
        self._timeout_s = timeout_s
        env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False,
                                   keep_trailing_newline=True)
        endpoint = endpoint_named(call.endpoint)
        self._list_key = endpoint.list_key  # `messages`, or `input` for the Responses API
        try:
            endpoint.check_params(call.params)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        self._model = call.model
        self._params = dict(call.params)
        self._parts: list[tuple[str, str | jinja2.Template | _Placeholders]] = []
        # an embeddings stage renders one text, its `input`; the others render messages
        self._embeds = call.endpoint == "embeddings"
        sources = ([("input", call.input or "", f"{key}.input")] if self._embeds else
                   [(m.role, m.content, f"{key}.messages[{index}].content")
                    for index, m in enumerate(call.messages)])
        for role, content, label in sources:
            if "{{" not in content and "{%" not in content:
                self._parts.append((role, content))
                continue
            simple = _Placeholders.parse(content, set(env.globals))
            if simple is not None:
                self._parts.append((role, simple))
                continue
            try:
                template = env.from_string(content)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{where}{label}: invalid template at line {e.lineno}: "
                                  f"{e.message}") from None
            self._parts.append((role, template))
        self._roles = [json.dumps(role) for role, _ in self._parts]
        self._labels = [label for _, _, label in sources]
        self._static = {index: canonical_json({"content": part, "role": role})
                        for index, (role, part) in enumerate(self._parts)
                        if isinstance(part, str)}
        self._head, self._tail = self._fragments()

    def build(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """The request for one item; `where` names the item in errors ("row 7")."""
        return self.build_with_json(fields, where)[0]

    def build_with_json(self, fields: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
        """The request and its canonical JSON, made from fragments fixed per pipeline.

        Only the rendered contents vary between items; serializing whole requests with
        sorted keys was a third of a re-run's time over a million done items.
        """
        messages = []
        pieces = []
        if self._embeds:
            text = self._render(0, fields, where)
            request = item_request(self._model, text, self._params)
            return request, canonical_json(request)
        for index, (role, part) in enumerate(self._parts):
            if isinstance(part, str):
                messages.append({"role": role, "content": part})
                pieces.append(self._static[index])
                continue
            if isinstance(part, _Placeholders):
                content = part.render(fields, self._labels[index], where)
            else:
                content = render_text(part, fields, self._labels[index], where, self._timeout_s)
            messages.append({"role": role, "content": content})
            pieces.append(f'{{"content":{json.dumps(content, ensure_ascii=False)},'
                          f'"role":{self._roles[index]}}}')
        request = {"model": self._model, self._list_key: messages, **self._params}
        return request, f"{self._head}[{','.join(pieces)}]{self._tail}"

    def _render(self, index: int, fields: dict[str, Any], where: str) -> str:
        """Part `index` rendered over `fields`."""
        part = self._parts[index][1]
        if isinstance(part, str):
            return part
        if isinstance(part, _Placeholders):
            return part.render(fields, self._labels[index], where)
        return render_text(part, fields, self._labels[index], where, self._timeout_s)

    def _fragments(self) -> tuple[str, str]:
        """Canonical JSON of the request around its `messages` value."""
        marker = "\u0000messages\u0000"
        whole = canonical_json({"model": self._model, self._list_key: marker, **self._params})
        head, _, tail = whole.partition(json.dumps(marker, ensure_ascii=False))
        return head, tail

def render_text(template: jinja2.Template, fields: dict[str, Any], label: str, where: str,
                timeout_s: float) -> str:
    """`template` rendered over `fields`, bounded in time and size; a `TemplateError` that
    names `where` (the row) and `label` (the key in the file) otherwise."""
    try:
        return bounded(timeout_s, _render_capped, template, fields)
    except Stopped:
        raise TemplateError(f"{where}: {label} was still rendering when the run was stopped; "
                            "nothing was sent") from None
    except OutOfTime:
        raise TemplateError(f"{where}: {label} took longer than {timeout_s:g} s to render "
                            "(step_timeout_s)") from None
    except _TooLong:
        raise TemplateError(f"{where}: {label} renders to more than {MAX_RENDERED_CHARS} "
                            "characters") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"{where}: {label}: {_undefined_reason(e)}") from None
    except Exception as e:  # a sandbox refusal or a filter failing on this row's data
        raise TemplateError(f"{where}: {label}: {type(e).__name__}: {e}") from None


class Condition:
    """A stage's `when:`: a Jinja2 expression over the item's fields and earlier outputs,
    true or false for one item (`{{ x > 1 }}`, or `x > 1` as it is)."""

    FALSE_TEXTS = frozenset({"", "false", "0", "no", "none", "null"})

    def __init__(self, when: str, label: str, timeout_s: float = 10) -> None:
        env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False)
        source = when if "{{" in when or "{%" in when else "{{ " + when + " }}"
        self._template = env.from_string(source)
        self._label = label
        self._timeout_s = timeout_s

    def holds(self, fields: dict[str, Any], where: str) -> bool:
        """Whether the stage applies to this item; a `TemplateError` when it cannot tell."""
        text = render_text(self._template, fields, self._label, where, self._timeout_s)
        return text.strip().lower() not in self.FALSE_TEXTS


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, where `*` and `**` cannot build a value past the rendered limit in one
    step (`'x' * 10**10` would take the memory before any output is counted)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 1_000:
            raise SecurityError(f"exponent {right} is too large")
        if operator == "*":
            sizes = [len(value) if isinstance(value, (str, list, tuple)) else 1
                     for value in (left, right)]
            counts = [value for value in (left, right) if isinstance(value, int)]
            if counts and max(sizes) * max(counts) > MAX_RENDERED_CHARS:
                raise SecurityError("a repetition too large for a message")
        return super().call_binop(context, operator, left, right)


def _render_capped(template: jinja2.Template, fields: dict[str, Any]) -> str:
    """The rendered text, stopped as soon as it is longer than `MAX_RENDERED_CHARS` (a loop
    in a template can make gigabytes; none of it is held past the limit)."""
    parts = []
    size = 0
    for part in template.generate(fields):
        size += len(part)
        if size > MAX_RENDERED_CHARS:
            raise _TooLong
        parts.append(part)
    return "".join(parts)


class _TooLong(Exception):
    """A template rendered past `MAX_RENDERED_CHARS`."""


class _Placeholders:
    """A template of plain text and `{{ field }}` only, rendered without Jinja's machinery.

    Jinja2 sets up a context per render (a quarter of a re-run's time over a million done
    items); for this shape the output is the same: each field's `str()` in place.
    """

    def __init__(self, pieces: list[str], names: list[str]) -> None:
        self._pieces = pieces
        self._names = names

    @classmethod
    def parse(cls, text: str, reserved: set[str]) -> _Placeholders | None:
        """The placeholders of `text`, or None when it uses anything else of Jinja."""
        pieces = PLACEHOLDER.split(text)
        literals, names = pieces[0::2], pieces[1::2]
        if any(mark in literal for literal in literals for mark in ("{{", "{%", "{#", "}}")):
            return None
        if any(name in reserved or name.lower() in JINJA_LITERALS for name in names):
            return None  # `none`, `true`, `range`...: Jinja's own names, left to Jinja
        return cls(literals, names)

    def render(self, fields: dict[str, Any], label: str, where: str) -> str:
        out = [self._pieces[0]]
        for name, literal in zip(self._names, self._pieces[1:]):
            if name not in fields:
                raise TemplateError(f"{where}: {label}: missing template field {name!r}")
            value = fields[name]
            out.append(value if isinstance(value, str) else str(value))
            out.append(literal)
        text = "".join(out)
        if len(text) > MAX_RENDERED_CHARS:
            raise TemplateError(f"{where}: {label} renders to "
                                f"{len(text)} characters, more than {MAX_RENDERED_CHARS}")
        return text


def _undefined_reason(error: jinja2.UndefinedError) -> str:
    message = str(error.message or error)
    if message.endswith("is undefined") and message.startswith("'"):
        return f"missing template field {message.split(chr(39))[1]!r}"
    return message
