"""Reading a pipeline file: YAML, `${VAR}` substitution, validation into `PipelineConfig`.

`load_config(path)` either returns a `PipelineConfig` or raises one `ConfigError` whose message
names the file, every offending key path and what was expected there.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flow.arrow import require_parquet_reader
from flow.config.chain import check_chain, inherit_defaults
from flow.config.endpoint_check import check_endpoints
from flow.config.models import PipelineConfig
from flow.config.store_url import redact
from flow.endpoints.responses import structured_output
from flow.errors import ConfigError
from flow.schema import load_schema

ENV_PATTERN = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_VALUES = 100_000  # a pipeline file holds far fewer; aliases can make billions


class _Loader(yaml.SafeLoader):
    """YAML as a pipeline file needs it: dates stay the text they are written as (a date is
    not JSON), and a plain scalar that is a whole `${VAR}` is marked to keep YAML's type."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


class _WholeVar(str):
    """A plain YAML scalar that is one `${VAR}`: its value is read as YAML (`0` is a number)."""


_WHOLE_VAR = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}$")
_Loader.add_implicit_resolver("tag:flow,2026:var", _WHOLE_VAR, ["$"])


def _whole_var(loader: yaml.SafeLoader, node: yaml.Node) -> _WholeVar:
    assert isinstance(node, yaml.ScalarNode)
    return _WholeVar(loader.construct_scalar(node))


_Loader.add_constructor("tag:flow,2026:var", _whole_var)


def load_config(path: str | Path) -> PipelineConfig:
    """Read, substitute and validate a pipeline file; paths in it become absolute."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such pipeline file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read: {e.strerror or e}") from None
    return parse_config(text, file)


def parse_config(text: str, file: Path) -> PipelineConfig:
    """Validate the YAML text of a pipeline file that lives at `file`."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        if "${" in line:
            problem += ('; quote a ${VAR} inside [...] or {...} ("${VAR}"), or write the '
                        "mapping one key per line, where a bare ${VAR} keeps its YAML type")
        raise ConfigError(f"{file}: invalid YAML at {where}: {problem}") from None
    except Exception as e:  # yaml can raise plain ValueError/RecursionError on hostile input
        raise ConfigError(f"{file}: invalid YAML: {type(e).__name__}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{file}: expected a mapping of keys (store, load, call, post, or "
                          f"stages), got {got}")
    _count_values(raw, file)
    raw = inherit_defaults(_substitute_env(raw, file, ()), file)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe_errors(file, e)) from None
    check_chain(config, file)
    check_endpoints(config, file)
    base = file.resolve().parent
    if isinstance(config.store, Path):
        config.store = base / config.store
    config.load.path = base / config.load.path
    config._file = file.resolve()
    if not config.load.resolved_format:
        raise ConfigError(
            f"{file}: load.path: cannot tell the format of '{config.load.path.name}'; "
            "name it .jsonl, .csv, .txt or .parquet, or set load.format"
        )
    if config.load.resolved_format == "parquet":
        require_parquet_reader(f"{file}: load.path {config.load.path.name} (Parquet)")
    _load_schemas(config, file, base)
    return config


def _load_schemas(config: PipelineConfig, file: Path, base: Path) -> None:
    """Each stage's `schema` loaded and asked for as its `response_format` (the Responses
    API's `text.format`)."""
    for index, stage in enumerate(config.chain):
        key = "call" if config.stages is None else f"stages[{index}]"
        if stage.output_schema is None:
            continue
        param = "text" if stage.endpoint == "responses" else "response_format"
        if param in stage.params:
            raise ConfigError(f"{file}: {key}.params.{param}: {key}.schema sets it; "
                              "remove one of them")
        checker = load_schema(stage.output_schema, base, f"{file}: {key}.schema")
        stage.params[param] = (structured_output(checker.name, checker.schema, checker.strict)
                               if stage.endpoint == "responses" else checker.response_format())
        stage._checker = checker


def _substitute_env(value: Any, file: Path, where: tuple[str | int, ...]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string; `$${VAR}` stays literal."""
    if isinstance(value, dict):
        return {key: _substitute_env(item, file, (*where, str(key))) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute_env(item, file, (*where, index)) for index, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if isinstance(value, _WholeVar):
        # `temperature: ${TEMP}` with TEMP=0 is the number 0, as if 0 were written there
        text = _substitute_env(str(value), file, where)
        try:
            typed = yaml.load(text, Loader=_Loader)  # a SafeLoader
        except yaml.YAMLError:
            return text
        return typed if isinstance(typed, (int, float, bool)) or typed is None else text

    def replace(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        found = os.environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        raise ConfigError(
            f"{file}: {_key_path(where)}: environment variable {name} is not set; "
            f"export it or write ${{{name}:-default}}"
        )

    return ENV_PATTERN.sub(replace, value)


def _count_values(raw: Any, file: Path) -> None:
    """Refuse a file whose aliases expand to more values than any pipeline has (a YAML
    alias bomb is a few hundred bytes that stand for billions of values)."""
    count = 0
    stack = [raw]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{file}: more than {MAX_VALUES:,} values once YAML aliases "
                              "(*name) are expanded; a pipeline file needs far fewer")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def check_api_key(key: str, where: str) -> str:
    """The key, or a `ConfigError` when it cannot go in an HTTP header as it is (never
    quoting it)."""
    if key != key.strip():
        raise ConfigError(f"{where}: the API key has spaces or line breaks around it (a "
                          "Windows line ending from a .env file?); remove them")
    if not key.isascii() or not key.isprintable():
        raise ConfigError(f"{where}: the API key holds characters an API key never has "
                          "(not printable ASCII); copy it again from your provider")
    return key


def _key_path(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _describe_errors(file: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(part for part in item["loc"] if not _is_union_tag(part))
        key = _key_path(loc)
        if item["type"] == "extra_forbidden" and loc:
            allowed = _allowed_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"{key}: unknown key; {hint}expected one of: {', '.join(allowed)}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            got = item.get("input")
            if loc[:1] == ("store",) and isinstance(got, str):
                got = redact(got)  # never a password in a message
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message} (got {shown[:80]})")
    unique = list(dict.fromkeys(lines))
    head = f"{file}: invalid pipeline"
    return head + ":\n  " + "\n  ".join(unique) if len(unique) > 1 else f"{head}: {unique[0]}"


def _is_union_tag(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", {})
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", None)
        model = inner[0] if inner else annotation
        while getattr(model, "__origin__", None) is list:  # `stages`: a list of models
            model = model.__args__[0]
    fields = getattr(model, "model_fields", {})
    return sorted(field.alias or name for name, field in fields.items())
