"""What the simulator answers: a reply in the shape the request asks for, sized to fit its cap.

- `response_format: json_schema` gets an object that conforms to the schema (`schemas`);
- a request that asks for JSON (`json_object`, or a prompt that says JSON) gets an object with
  the keys the prompt names and values that fit what it says of them (`prompts`); options it
  lists apart from any key go to the first string key without options of its own. A prompt
  that names no keys gets `{"answer", "echo", "id"}`;
- any other request gets the option the prompt lists for its answer, if it lists some
  (`positive, negative or neutral`), else `Simulated reply <id>: <words>. You asked: <prompt>`.

Every shape has drafts, fullest first; the reply is the fullest draft within
`max_completion_tokens` (or `max_tokens`), counted by the model's tokenizer. Only a cap below
the briefest draft cuts the reply short, with `finish_reason: length`. Values are drawn from
the request's digest (`values`), so the same request always gets the same reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import toktok

from flow.keys import content_key
from flow.simulator.prompts import KeyHint, PromptShape, read_prompt
from flow.simulator.schemas import broken_value, value_for_schema
from flow.simulator.values import integer_between, number_between, pick, words
from flow.tokens import encoding_for_model

ECHO_CHARS = 200
DEFAULT_INTEGERS = (1, 10)
DEFAULT_NUMBERS = (0.0, 1.0)


def compose_reply(body: Mapping[str, Any], messages: list[Any],
                  model: str, broken: bool = False) -> tuple[str, int, str]:
    """The reply to a chat completion request, its completion tokens and its finish reason;
    `broken`: one that breaks the request's `json_schema`.

    Raises `schemas.SchemaError` for a `json_schema` no value can be made for.
    """
    drafts = draft_replies(body, messages, broken)
    encoding = encoding_for_model(model)
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
        return drafts[0], toktok.batch_count(drafts[:1], encoding, threads=1)[0], "stop"
    for draft, count in zip(drafts, toktok.batch_count(drafts, encoding, threads=1)):
        if count <= cap:
            return draft, count, "stop"
    cut, _ = toktok.truncate(drafts[-1], cap, encoding)
    return cut, cap, "length"


def breaks_schema(body: Mapping[str, Any], messages: list[Any], rate: float,
                  again_rate: float = 0.0) -> bool:
    """Whether this request's reply is to break its `json_schema`: the same for the same
    messages, at `rate` for a first ask (`--schema-break-rate`) and at `again_rate` for a
    re-ask, a request that already holds an assistant's reply (`--schema-rebreak-rate`:
    most models told their mistake correct it)."""
    if _schema_of(body.get("response_format")) is None:
        return False
    if any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
        rate = again_rate
    return rate > 0 and int(content_key(messages)[7:15], 16) / 16**8 < rate


def draft_replies(body: Mapping[str, Any], messages: list[Any],
                  broken: bool = False) -> list[str]:
    """The replies this request may get, fullest first, each in the shape it asks for."""
    seed = content_key(messages)[7:]
    contents = [_text_of(m.get("content")) for m in messages if isinstance(m, Mapping)]
    text = "\n".join(contents)
    response_format = body.get("response_format")
    format_type = response_format.get("type") if isinstance(response_format, Mapping) else None
    schema = _schema_of(response_format)
    if schema is not None:
        values = [value_for_schema(schema, seed, brief) for brief in (False, True)]
        if broken:
            values = [broken_value(value, schema) for value in values]
        return [_dump(value, brief) for value, brief in zip(values, (False, True))]
    shape = read_prompt(text)
    if format_type in ("json_object", "json_schema") or "json" in text.lower():
        if shape.keys:
            return [_dump(_keyed_object(shape, seed, brief), brief) for brief in (False, True)]
        user = _last_user_text(messages)
        answer = f"simulated {words(seed, '$.answer', 6)}"
        return [_dump({"answer": answer, "echo": user[:ECHO_CHARS], "id": seed[:8]}),
                _dump({"answer": answer, "id": seed[:8]}),
                _dump({"answer": words(seed, "$.answer", 1)}, brief=True)]
    if shape.options:
        return [pick(seed, "$", shape.options)]
    sentence = f"Simulated reply {seed[:8]}: {words(seed, '$', 6)}."
    return [f"{sentence} You asked: {_last_user_text(messages)[:ECHO_CHARS]}", sentence,
            words(seed, "$", 1)]


def _keyed_object(shape: PromptShape, seed: str, brief: bool) -> dict[str, Any]:
    """An object with the keys the prompt names; its own options go to the first plain key."""
    taker = next((key.name for key in shape.keys if key.kind == "string" and not key.options),
                 None)
    return {key.name: _hinted_value(key, shape.options if key.name == taker else (), seed,
                                    f"$.{key.name}", brief) for key in shape.keys}


def _hinted_value(key: KeyHint, options: tuple[str, ...], seed: str, path: str,
                  brief: bool) -> Any:
    """A value of the kind the prompt gives `key`, among its options or within its range."""
    if key.options or options:
        return pick(seed, path, key.options or options)
    if key.kind == "boolean":
        return pick(seed, path, [True, False])
    if key.kind == "integer":
        low = DEFAULT_INTEGERS[0] if key.low is None else int(key.low)
        high = DEFAULT_INTEGERS[1] if key.high is None else int(key.high)
        return integer_between(seed, path, low, high)
    if key.kind == "number":
        return number_between(seed, path,
                              DEFAULT_NUMBERS[0] if key.low is None else key.low,
                              DEFAULT_NUMBERS[1] if key.high is None else key.high)
    if key.kind == "list":
        return [words(seed, f"{path}[{index}]", 1) for index in range(1 if brief else 2)]
    return words(seed, path, 1) if brief else f"simulated {words(seed, path, 3)}"


def _schema_of(response_format: Any) -> Mapping[str, Any] | None:
    """The schema of a `json_schema` response format, if it has one."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    return schema if isinstance(schema, Mapping) else None


def _last_user_text(messages: list[Any]) -> str:
    return next((_text_of(m.get("content")) for m in reversed(messages)
                 if isinstance(m, Mapping) and m.get("role") == "user"), "")


def _text_of(content: Any) -> str:
    """A message's text: its string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content
                         if isinstance(part, Mapping) and part.get("type") == "text")
    return "" if content is None else str(content)


def _dump(value: Any, brief: bool = False) -> str:
    """JSON text; a brief one without the spaces after `,` and `:`."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":") if brief else None)
