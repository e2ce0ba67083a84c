"""The simulator answers a `json_schema` response format with a value that conforms to it."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from flow.simulator.schemas import SchemaError, value_for_schema

TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool,
                         "null": type(None), "integer": int, "number": (int, float)}


def violations(value: Any, schema: Any, root: dict[str, Any], path: str = "$") -> list[str]:
    """Where `value` breaks `schema`: a small checker for the keywords the simulator covers."""
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return violations(value, {**target, **{k: v for k, v in schema.items() if k != "$ref"}},
                          root, path)
    found: list[str] = []
    for part in schema.get("allOf", []):
        found += violations(value, part, root, path)
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            passing = [b for b in schema[keyword] if not violations(value, b, root, path)]
            if len(passing) < 1 or (keyword == "oneOf" and len(passing) > 1):
                found.append(f"{path}: {keyword} matched {len(passing)} branches")
    if "const" in schema and value != schema["const"]:
        found.append(f"{path}: not the const")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in enum")
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds is not None and not any(_is(value, kind) for kind in kinds):
        return found + [f"{path}: {value!r} is not {kinds}"]
    if isinstance(value, dict):
        found += [f"{path}: {name} missing" for name in schema.get("required", [])
                  if name not in value]
        for name, item in value.items():
            if name in schema.get("properties", {}):
                found += violations(item, schema["properties"][name], root, f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}: {name} not allowed")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
            found.append(f"{path}: {len(value)} items")
        prefix = schema.get("prefixItems", [])
        for index, item in enumerate(value):
            sub = prefix[index] if index < len(prefix) else schema.get("items", {})
            if sub is False:
                found.append(f"{path}[{index}]: no item allowed here")
            found += violations(item, sub, root, f"{path}[{index}]")
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            found.append(f"{path}: length {len(value)}")
        if schema.get("format") == "date" and not re.fullmatch(r"\d{4}-\d\d-\d\d", value):
            found.append(f"{path}: not a date")
    if isinstance(value, int | float) and not isinstance(value, bool):
        checks = [("minimum", value >= schema.get("minimum", -math.inf)),
                  ("maximum", value <= schema.get("maximum", math.inf)),
                  ("exclusiveMinimum", value > schema.get("exclusiveMinimum", -math.inf)),
                  ("exclusiveMaximum", value < schema.get("exclusiveMaximum", math.inf)),
                  ("multipleOf", value % schema.get("multipleOf", 1) == 0
                   if schema.get("type") == "integer" else True)]
        found += [f"{path}: {value} breaks {name}" for name, ok in checks if not ok]
    return found


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, TYPES[kind])


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "stars": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 6},
        "even": {"type": "integer", "minimum": 3, "maximum": 9, "multipleOf": 2},
        "below": {"type": "number", "maximum": -50},
        "flag": {"type": "boolean"},
        "nothing": {"type": "null"},
        "maybe": {"type": ["string", "null"]},
        "kind": {"const": "review"},
        "code": {"type": "string", "minLength": 12, "maxLength": 14},
        "initial": {"type": "string", "maxLength": 1},
        "day": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 4},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}],
                 "items": False},
        "author": {"$ref": "#/$defs/Person"},
        "either": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Person"}]},
        "both": {"allOf": [{"$ref": "#/$defs/Person"},
                           {"properties": {"age": {"type": "integer", "minimum": 18}},
                            "required": ["age"]}]},
    },
    "required": ["label", "score", "stars", "even", "tags", "author", "both", "pair"],
    "additionalProperties": False,
    "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}},
                         "required": ["name"]}},
}


@given(seed=st.text(max_size=12), brief=st.booleans())
def test_every_value_conforms_whatever_the_seed(seed: str, brief: bool) -> None:
    value = value_for_schema(SCHEMA, seed, brief)
    assert violations(value, SCHEMA, SCHEMA) == []
    assert set(value) >= set(SCHEMA["required"])


def test_a_full_value_has_every_property_and_a_brief_one_only_the_required() -> None:
    assert set(value_for_schema(SCHEMA, "s")) == set(SCHEMA["properties"])
    assert set(value_for_schema(SCHEMA, "s", brief=True)) == set(SCHEMA["required"])


def test_the_same_seed_gets_the_same_value_and_enums_are_all_reachable() -> None:
    assert value_for_schema(SCHEMA, "one") == value_for_schema(SCHEMA, "one")
    labels = {value_for_schema(SCHEMA, str(seed))["label"] for seed in range(40)}
    assert labels == {"positive", "negative", "neutral"}


class Node(BaseModel):
    name: str
    children: list[Node]
    parent: Node | None


class Review(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0, le=1)
    stars: int = Field(gt=0, lt=6)
    tags: list[str] = Field(min_length=1, max_length=3)
    summary: str = Field(max_length=20)
    note: str | None = None
    tree: Node


@pytest.mark.parametrize("brief", [False, True])
def test_a_schema_made_by_pydantic_recursion_included_validates_with_its_model(
        brief: bool) -> None:
    schema = Review.model_json_schema()
    for seed in ("a", "b", "c"):
        Review.model_validate(value_for_schema(schema, seed, brief))


@pytest.mark.parametrize("schema, message", [
    ({"$ref": "#/$defs/Missing"}, "leads nowhere"),
    ({"$ref": "https://example.com/schema.json"}, "only local references"),
    ({"$ref": "#/$defs/Loop", "$defs": {"Loop": {"type": "object", "required": ["next"],
                                                  "properties": {"next": {"$ref": "#/$defs/Loop"}}}}},
     "nested more than"),
])
def test_a_schema_no_value_can_be_made_for_is_a_schema_error(schema: dict[str, Any],
                                                              message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        value_for_schema(schema, "s")


def test_a_malformed_or_permissive_schema_still_gets_a_value() -> None:
    assert value_for_schema({"type": 5, "properties": [1]}, "s") == {}
    assert isinstance(value_for_schema({"type": "object", "properties": {"a": True}}, "s")["a"],
                      str)
    assert isinstance(value_for_schema({}, "s"), str)
