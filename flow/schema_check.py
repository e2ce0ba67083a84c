"""Whether a JSON value matches a JSON Schema: the first mismatch, with its path, or None.

Covers the keywords structured outputs accept (as the simulator's `schemas` does): `type`
(one or a list), `properties`, `required`, `additionalProperties`, `enum`, `const`, `items`,
`prefixItems`, `minItems`/`maxItems`, `minLength`/`maxLength`, `minimum`, `maximum`,
`exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`, `anyOf`, `oneOf`, `allOf` and local
`$ref`s into `$defs` (or `definitions`). `pattern` and `format` are not checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 64
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def first_mismatch(value: Any, schema: Mapping[str, Any]) -> str | None:
    """Where and how `value` breaks `schema` (`$.grade: expected integer, got "A"`), or None."""
    return _Check(schema).mismatch(value, schema, "$", 0)


class _Check:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def resolve(self, node: Any) -> Mapping[str, Any]:
        seen = 0
        while isinstance(node, Mapping) and isinstance(node.get("$ref"), str) and seen < 32:
            ref, seen = node["$ref"], seen + 1
            target: Any = self.root
            for part in ref.removeprefix("#").strip("/").split("/") if ref != "#" else []:
                target = target.get(part) if isinstance(target, Mapping) else None
            node = target
        return node if isinstance(node, Mapping) else {}

    def mismatch(self, value: Any, node: Any, path: str, depth: int) -> str | None:
        if depth > MAX_DEPTH:
            return None
        node = self.resolve(node)
        if "const" in node and value != node["const"]:
            return f"{path}: expected {_show(node['const'])}, got {_show(value)}"
        if isinstance(node.get("enum"), list) and not any(
                (value == option and type(value) is type(option)) or
                (_is_number(value) and _is_number(option) and value == option)
                for option in node["enum"]):
            return (f"{path}: expected one of {', '.join(_show(o) for o in node['enum'])}, "
                    f"got {_show(value)}")
        for keyword in ("anyOf", "oneOf"):
            branches = node.get(keyword)
            if isinstance(branches, list) and branches:
                misses = [self.mismatch(value, b, path, depth + 1) for b in branches]
                if all(misses):
                    return next(m for m in misses if m)
        for branch in node.get("allOf") or []:
            if (miss := self.mismatch(value, branch, path, depth + 1)) is not None:
                return miss
        types = node.get("type")
        if types is not None:
            allowed = types if isinstance(types, list) else [types]
            if not any(_is_type(value, t) for t in allowed):
                return f"{path}: expected {' or '.join(map(str, allowed))}, got {_show(value)}"
        if isinstance(value, dict):
            return self.object_mismatch(value, node, path, depth)
        if isinstance(value, list):
            return self.array_mismatch(value, node, path, depth)
        if isinstance(value, str):
            if len(value) < node.get("minLength", 0):
                return f"{path}: shorter than {node['minLength']} characters"
            if "maxLength" in node and len(value) > node["maxLength"]:
                return f"{path}: longer than {node['maxLength']} characters"
        if _is_number(value):
            return _number_mismatch(value, node, path)
        return None

    def object_mismatch(self, value: dict[str, Any], node: Mapping[str, Any], path: str,
                        depth: int) -> str | None:
        properties = node.get("properties") or {}
        for name in node.get("required") or []:
            if name not in value:
                return f"{path}: missing required property {name!r}"
        extra = node.get("additionalProperties", True)
        for name, item in value.items():
            where = f"{path}.{name}"
            if name in properties:
                if (miss := self.mismatch(item, properties[name], where, depth + 1)) is not None:
                    return miss
            elif extra is False:
                return f"{path}: unexpected property {name!r}"
            elif isinstance(extra, Mapping) and (
                    miss := self.mismatch(item, extra, where, depth + 1)) is not None:
                return miss
        return None

    def array_mismatch(self, value: list[Any], node: Mapping[str, Any], path: str,
                       depth: int) -> str | None:
        if len(value) < node.get("minItems", 0):
            return f"{path}: fewer than {node['minItems']} items"
        if "maxItems" in node and len(value) > node["maxItems"]:
            return f"{path}: more than {node['maxItems']} items"
        prefix = node.get("prefixItems") or []
        for index, item in enumerate(value):
            schema = prefix[index] if index < len(prefix) else node.get("items")
            if isinstance(schema, Mapping):
                miss = self.mismatch(item, schema, f"{path}[{index}]", depth + 1)
                if miss is not None:
                    return miss
        return None


def _number_mismatch(value: float, node: Mapping[str, Any], path: str) -> str | None:
    for keyword, words in (("minimum", "less than"), ("maximum", "more than"),
                           ("exclusiveMinimum", "not more than"),
                           ("exclusiveMaximum", "not less than")):
        bound = node.get(keyword)
        if not isinstance(bound, (int, float)) or isinstance(bound, bool):
            continue
        broken = {"minimum": value < bound, "maximum": value > bound,
                  "exclusiveMinimum": value <= bound, "exclusiveMaximum": value >= bound}
        if broken[keyword]:
            return f"{path}: {_show(value)} is {words} {_show(bound)}"
    step = node.get("multipleOf")
    if isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0 and (value / step) % 1 != 0:
        return f"{path}: {_show(value)} is not a multiple of {_show(step)}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_type(value: Any, name: Any) -> bool:
    if name == "integer":
        return _is_number(value) and float(value).is_integer()
    if name == "number":
        return _is_number(value)
    kind = _TYPES.get(str(name))
    return kind is not None and isinstance(value, kind) and not (
        kind is not bool and isinstance(value, bool))


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
