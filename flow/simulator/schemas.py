"""A JSON value that conforms to a JSON schema, as structured outputs (`json_schema`) return.

Covers what structured outputs accept: `type` (one or a list), `properties` and `required`,
`enum` and `const`, `items` and `prefixItems` with `minItems`/`maxItems`, strings with
`minLength`/`maxLength` and the common `format`s, numbers and integers within `minimum`,
`maximum`, `exclusiveMinimum` and `exclusiveMaximum` (integers also `multipleOf`), booleans,
null, `anyOf`/`oneOf` (the first branch that is not null), `allOf` (merged) and local `$ref`s
into `$defs`. `pattern` is not followed. A brief value leaves out optional properties and has
one-word strings and the fewest array items allowed; so does any value nested `DEEP` levels
down, where an optional branch is also left null, so a recursive schema ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flow.simulator.values import integer_between, number_between, pick, words

MAX_DEPTH = 32
DEEP = 4
DEFAULT_SPAN = 100  # a number with one bound only is drawn within this distance of it
FORMATS = {"date-time": "2024-01-15T09:30:00Z", "date": "2024-01-15", "time": "09:30:00",
           "duration": "P1D", "email": "someone@example.com", "hostname": "example.com",
           "ipv4": "192.0.2.1", "ipv6": "2001:db8::1", "uri": "https://example.com/",
           "uuid": "123e4567-e89b-12d3-a456-426614174000"}
TYPES_BY_KEYWORD = [("properties", "object"), ("items", "array"), ("prefixItems", "array"),
                    ("minimum", "number"), ("maximum", "number"), ("minLength", "string")]


class SchemaError(ValueError):
    """A schema no value can be made for: a `$ref` that leads nowhere, or endless nesting."""


def value_for_schema(schema: Mapping[str, Any], seed: str, brief: bool = False) -> Any:
    """A value that conforms to `schema`, the same for the same seed; raises `SchemaError`."""
    return _Values(schema, seed, brief).value(schema, "$", 0)


def broken_value(value: Any, schema: Mapping[str, Any]) -> Any:
    """`value` made to break `schema` as a model's slip would: a required property left
    out; else the object given as a list."""
    required = schema.get("required")
    if isinstance(value, dict) and isinstance(required, list) and required:
        return {key: item for key, item in value.items() if key != required[0]}
    return [value]


class _Values:
    """Walks one schema, resolving `$ref`s against its root."""

    def __init__(self, root: Mapping[str, Any], seed: str, brief: bool) -> None:
        self.root = root
        self.seed = seed
        self.brief = brief

    def value(self, node: Any, path: str, depth: int) -> Any:
        """The value for `node` at `path`."""
        if depth > MAX_DEPTH:
            raise SchemaError(f"{path}: nested more than {MAX_DEPTH} deep")
        node = self.resolve(node, path)
        if "const" in node:
            return node["const"]
        if isinstance(node.get("enum"), list) and node["enum"]:
            return pick(self.seed, path, node["enum"])
        branches = node.get("anyOf") or node.get("oneOf")
        if isinstance(branches, list) and branches:
            resolved = [self.resolve(branch, path) for branch in branches]
            chosen = next((b for b in resolved if (_type_of(b) == "null") == (depth >= DEEP)),
                          resolved[0])
            return self.value({**_without(node, "anyOf", "oneOf"), **chosen}, path, depth + 1)
        kind = _type_of(node)
        if kind == "object":
            return self.object(node, path, depth)
        if kind == "array":
            return self.array(node, path, depth)
        if kind == "integer":
            return _integer(node, self.seed, path)
        if kind == "number":
            return _number(node, self.seed, path)
        if kind == "boolean":
            return pick(self.seed, path, [True, False])
        if kind == "null":
            return None
        return _string(node, self.seed, path, self.brief)

    def resolve(self, node: Any, path: str) -> dict[str, Any]:
        """`node` with its `$ref` followed and its `allOf` merged into one schema."""
        if not isinstance(node, Mapping):
            return {}  # `true` or a malformed node: anything goes, and a string will do
        resolved = dict(node)
        for _ in range(MAX_DEPTH):
            reference = resolved.pop("$ref", None)
            if reference is None:
                break
            resolved = {**self.pointer(reference, path), **resolved}
        parts = resolved.pop("allOf", None)
        if isinstance(parts, list):
            for part in (self.resolve(part, path) for part in parts):
                properties = {**part.get("properties", {}), **resolved.get("properties", {})}
                required = [*part.get("required", []), *resolved.get("required", [])]
                resolved = {**part, **resolved, "properties": properties, "required": required}
        return resolved

    def pointer(self, reference: Any, path: str) -> dict[str, Any]:
        """The schema a local `$ref` (`#/$defs/Name`) points to."""
        if not isinstance(reference, str) or not reference.startswith("#"):
            raise SchemaError(f"{path}: only local references (#/...) are followed: {reference!r}")
        target: Any = self.root
        for escaped in filter(None, reference[1:].split("/")):
            part = escaped.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                raise SchemaError(f"{path}: reference {reference!r} leads nowhere")
            target = target[part]
        if not isinstance(target, Mapping):
            raise SchemaError(f"{path}: reference {reference!r} is not a schema")
        return dict(target)

    def object(self, node: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        properties = node.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        required = node.get("required")
        required = set(required) if isinstance(required, list) else set()
        brief = self.brief or depth >= DEEP
        return {name: self.value(schema, f"{path}.{name}", depth + 1)
                for name, schema in properties.items() if not brief or name in required}

    def array(self, node: dict[str, Any], path: str, depth: int) -> list[Any]:
        prefix: list[Any] = node.get("prefixItems") or []
        if not isinstance(prefix, list):
            prefix = []
        least = _whole(node.get("minItems")) or 0
        most = _whole(node.get("maxItems"))
        if depth >= DEEP:
            count = least
        elif self.brief:
            count = max(least, 1)
        else:
            count = max(least, len(prefix), 2)
        if most is not None:
            count = max(least, min(count, most))
        items = node.get("items", {})
        if items is False:  # no items beyond the prefix
            count = min(count, len(prefix))
        return [self.value(prefix[index] if index < len(prefix) else items,
                           f"{path}[{index}]", depth + 1) for index in range(count)]


def _type_of(node: Mapping[str, Any]) -> str:
    """The schema's type; the first that is not null when it lists several."""
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if isinstance(kind, str):
        return kind
    return next((kind for keyword, kind in TYPES_BY_KEYWORD if keyword in node), "string")


def _without(node: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in node.items() if key not in keys}


def _whole(value: Any) -> int | None:
    """`value` if it is a whole number (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _bound(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _bounds(node: Mapping[str, Any]) -> tuple[float | None, float | None, bool, bool]:
    """Lower and upper bound, and whether each is exclusive."""
    low, high = _bound(node.get("minimum")), _bound(node.get("maximum"))
    above, below = _bound(node.get("exclusiveMinimum")), _bound(node.get("exclusiveMaximum"))
    low_open = above is not None and (low is None or above >= low)
    high_open = below is not None and (high is None or below <= high)
    return (above if low_open else low, below if high_open else high, low_open, high_open)


def _integer(node: Mapping[str, Any], seed: str, path: str) -> int:
    low, high, low_open, high_open = _bounds(node)
    least = None if low is None else (math.floor(low) + 1 if low_open else math.ceil(low))
    most = None if high is None else (math.ceil(high) - 1 if high_open else math.floor(high))
    if least is None:
        least = 0 if most is None or most >= 0 else most - DEFAULT_SPAN
    if most is None:
        most = least + DEFAULT_SPAN
    step = _whole(node.get("multipleOf")) or 1
    first = -(-least // step) * step  # the first multiple of `step` at or above `least`
    if step <= 1 or first > most:
        return integer_between(seed, path, least, most)
    return first + step * integer_between(seed, path, 0, (most - first) // step)


def _number(node: Mapping[str, Any], seed: str, path: str) -> float:
    low, high, _, _ = _bounds(node)
    if low is None:
        low = 0.0 if high is None else min(0.0, high - DEFAULT_SPAN)
    if high is None:
        high = max(1.0, low + DEFAULT_SPAN) if low else 1.0
    # strictly inside, so an open bound is kept too
    return number_between(seed, path, low, high)


def _string(node: Mapping[str, Any], seed: str, path: str, brief: bool) -> str:
    text = FORMATS.get(str(node.get("format")))
    if text is None:
        text = words(seed, path, 1) if brief else f"simulated {words(seed, path, 3)}"
    least, most = _whole(node.get("minLength")) or 0, _whole(node.get("maxLength"))
    while len(text) < least:
        text += " " + words(seed, f"{path}+{len(text)}", 1)
    if most is not None and len(text) > most:
        text = text[:most].rstrip() if most >= least else text[:most]
        text = text.ljust(least, "x")
    return text
