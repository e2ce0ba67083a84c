"""A chain of call stages as the pipeline file gives it: `defaults:` inherited by every
stage, and the checks a chain needs beyond each stage's own keys.

A stage's templates see the row's fields and each earlier stage by name (`answer.output`),
so a name used before its stage, a duplicate name or a `when:` that does not parse is a
`ConfigError` naming the key path, before anything is read or sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from flow.config.models import RUN_WIDE_KEYS, CallConfig, PipelineConfig
from flow.errors import ConfigError

# a stage adds to the defaults' keys of these
MERGED_MAPPINGS = ("params", "retry", "price", "headers", "batch")


def inherit_defaults(raw: dict[str, Any], file: Path) -> dict[str, Any]:
    """The file's keys with `defaults:` merged into each stage (a stage's own keys win;
    `params`, `retry`, `price` and `headers` are merged key by key)."""
    if "stages" not in raw:
        if "defaults" in raw:
            raise ConfigError(f"{file}: defaults: only a chain of `stages:` inherits "
                              "defaults; put these keys under call:")
        if "call" not in raw:
            raise ConfigError(f"{file}: call: required key is missing (or `stages:`, a chain "
                              "of calls)")
        return raw
    for key in ("call", "post"):
        if key in raw:
            raise ConfigError(f"{file}: {key}: a pipeline has `call:` and `post:`, or "
                              f"`stages:` (each with its own post:), not both; move {key}: "
                              "into a stage, or its keys into defaults:")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{file}: defaults: expected a mapping of call keys, got "
                          f"{type(defaults).__name__}")
    known = sorted(field.alias or name for name, field in CallConfig.model_fields.items())
    for key in defaults:
        if key not in known:
            raise ConfigError(f"{file}: defaults.{key}: unknown key; expected one of: "
                              f"{', '.join(known)}")
    stages = raw["stages"]
    if not isinstance(stages, list):
        return raw  # validation names it
    merged = []
    for stage in stages:
        if not isinstance(stage, dict):
            merged.append(stage)
            continue
        both = {**defaults, **stage}
        for key in MERGED_MAPPINGS:
            if isinstance(defaults.get(key), dict) and isinstance(stage.get(key), dict):
                both[key] = {**defaults[key], **stage[key]}
        merged.append(both)
    return {**raw, "stages": merged}


def check_chain(config: PipelineConfig, file: Path) -> None:
    """Names unique, each template naming only earlier stages, `when:` an expression,
    and the run-wide keys the same in every stage."""
    if config.stages is None:
        return
    names = [stage.name for stage in config.stages]
    env = SandboxedEnvironment()
    for index, stage in enumerate(config.stages):
        where = f"{file}: stages[{index}]"
        if stage.name in names[:index]:
            raise ConfigError(f"{where}.name: '{stage.name}' is already the name of "
                              f"stages[{names.index(stage.name)}]; give each stage its own name")
        later = set(names[index:])
        sources = [(f"messages[{n}].content", m.content) for n, m in enumerate(stage.messages)]
        if stage.input is not None:
            sources.append(("input", stage.input))
        if stage.when is not None:
            try:
                env.parse(stage.when)
                if "{{" not in stage.when and "{%" not in stage.when:
                    env.compile_expression(stage.when)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{where}.when: not a valid expression: {e.message}; "
                                  "write e.g. \"{{ answer.output | length > 0 }}\"") from None
            sources.append(("when", _as_template(stage.when)))
        for key, source in sources:
            try:
                used = meta.find_undeclared_variables(env.parse(source))
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{where}.{key}: invalid template at line {e.lineno}: "
                                  f"{e.message}") from None
            for name in sorted(used & later):
                whose = "this stage" if name == stage.name else "a later stage"
                raise ConfigError(
                    f"{where}.{key}: names '{name}', {whose}; a stage sees only the stages "
                    f"before it ({', '.join(names[:index]) or 'none here'}) and the row's fields")
        first = config.stages[0]
        for key in RUN_WIDE_KEYS:
            if getattr(stage, key) != getattr(first, key):
                raise ConfigError(f"{where}.{key}: differs from stages[0]; it applies to the "
                                  "whole run: set it once, in defaults:")


def _as_template(when: str) -> str:
    """`when:` as a template: `{{ x > 1 }}` as written, a bare expression wrapped."""
    return when if "{{" in when or "{%" in when else "{{ " + when + " }}"
