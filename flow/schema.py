"""Structured outputs: the JSON Schema a stage's replies must match (`call.schema`).

The schema is given inline, as a `.json` file beside the pipeline, or as a pydantic model
(`python: module:Model`). It is sent as `response_format: {type: json_schema, ...}`, strict
when every object in it lists all its properties as required (what strict mode demands;
flow then adds `additionalProperties: false`). Each reply is parsed and checked; a pydantic
model also validates it (its own validators too). `check` returns the first mismatch in
words, which a re-ask quotes to the model.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from flow.errors import ConfigError
from flow.keys import content_key
from flow.schema_check import first_mismatch

NAME = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class OutputSchema:
    """A stage's schema: what is sent, and how a reply is checked."""

    name: str
    schema: dict[str, Any]
    strict: bool
    model: type[BaseModel] | None = None

    def response_format(self) -> dict[str, Any]:
        """The `response_format` param that asks for it."""
        return {"type": "json_schema",
                "json_schema": {"name": self.name, "schema": self.schema, "strict": self.strict}}

    def check(self, value: Any) -> str | None:
        """The first way `value` breaks the schema, in words; None when it matches."""
        if self.model is not None:
            try:
                self.model.model_validate(value)
            except ValidationError as e:
                first = e.errors()[0]
                where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                      for p in first["loc"])
                return f"{where}: {first['msg']}"
            return None
        return first_mismatch(value, self.schema)

    @property
    def fingerprint(self) -> str:
        """What the check depends on: an edit of the schema checks stored replies again."""
        return content_key({"schema": self.schema, "model": self.model is not None})


def load_schema(spec: Any, base_dir: Path, where: str) -> OutputSchema:
    """The schema `spec` names (inline, a file, or `{python: module:Model}`); a ConfigError
    naming `where` (`pipeline.yaml: call.schema`) when it cannot be used."""
    model: type[BaseModel] | None = None
    if isinstance(spec, Mapping) and set(spec) == {"python"}:
        model = _import_model(str(spec["python"]), base_dir, where)
        schema, name = model.model_json_schema(), model.__name__
    elif isinstance(spec, Mapping):
        schema, name = dict(spec), str(spec.get("title") or "output")
    elif isinstance(spec, str):
        path = base_dir / spec
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: {spec}: no such file; give a JSON Schema inline, a "
                              ".json file beside the pipeline, or {python: module:Model}"
                              ) from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: {spec}: not a JSON file: {e}") from None
        name = str(schema.get("title") or Path(spec).stem) if isinstance(schema, dict) else ""
    else:
        raise ConfigError(f"{where}: expected a JSON Schema (a mapping), a path to a .json "
                          "file, or {python: module:Model}")
    if not isinstance(schema, dict) or not schema:
        raise ConfigError(f"{where}: the schema must be a non-empty JSON object")
    if schema.get("type", "object") != "object":
        raise ConfigError(f"{where}: structured outputs need an object at the top "
                          f"(type: object), got type: {schema.get('type')}")
    strict_form = _strict_form(schema)
    return OutputSchema(NAME.sub("_", name)[:64] or "output", strict_form or schema,
                        strict_form is not None, model)


def _strict_form(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The schema as strict mode takes it (every object closed), or None when some object
    has an optional property or takes any other (strict mode would refuse it)."""
    strict = copy.deepcopy(schema)
    nodes: list[Any] = [strict]
    while nodes:
        node = nodes.pop()
        if isinstance(node, list):
            nodes.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if node.get("type") == "object" or "properties" in node:
            properties = node.get("properties") or {}
            if set(node.get("required") or []) != set(properties) or node.get(
                    "additionalProperties", False) is not False or not properties:
                return None
            node["additionalProperties"] = False
        nodes.extend(node.values())
    return strict


def _import_model(target: str, base_dir: Path, where: str) -> type[BaseModel]:
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"{where}.python: expected 'module:Model', got {target!r}")
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail to import in any way
        raise ConfigError(f"{where}.python: cannot import {module_name}: "
                          f"{type(e).__name__}: {e}") from None
    model = getattr(module, class_name, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(f"{where}.python: {module_name}.{class_name} is not a pydantic model "
                          "(a class deriving from pydantic.BaseModel)")
    return model
