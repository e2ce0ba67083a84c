"""The pipeline file: read YAML, substitute `${VAR}`, validate into typed config.

`load_config(path)` either returns a `PipelineConfig` or raises one `ConfigError` whose message
names the file, every offending key path and what was expected there.
"""

from __future__ import annotations

import codecs
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from flow.errors import ConfigError

ENV_PATTERN = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
RESERVED_PARAMS = ("model", "messages", "stream", "n")
BUILTIN_POST_STEPS = ("strip", "json", "lower")
KEYED_POST_STEPS = ("regex", "python")


MAX_VALUES = 100_000  # a pipeline file holds far fewer; aliases can make billions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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


class LoadConfig(_Strict):
    """Where the items come from."""

    path: Path
    id: str | None = None
    format: Literal["jsonl", "csv", "txt"] | None = None
    encoding: str = "utf-8"
    max_row_bytes: int = Field(default=1_000_000, gt=0)
    max_row_lines: int = Field(default=100, gt=0)  # a CSV record's, quoted line breaks
    # CSV values arrive as text: a field named here is read as this type
    types: dict[str, Literal["str", "int", "float", "bool", "json"]] = Field(
        default_factory=dict)

    @field_validator("encoding")
    @classmethod
    def _line_based_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding '{encoding}'") from None
        if "\n".encode(encoding) != b"\n" or "a,{".encode(encoding) != b"a,{":
            raise ValueError(
                f"'{encoding}' is not supported: rows are read line by line as bytes, which "
                f"only works for UTF-8 and ASCII-based encodings; convert the file to UTF-8 "
                f"(iconv -f {encoding} -t utf-8)")
        return encoding

    @property
    def resolved_format(self) -> str:
        """The format given, or the one the file's suffix names."""
        if self.format:
            return self.format
        suffix = self.path.suffix.lower().lstrip(".")
        return {"jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv", "txt": "txt"}.get(suffix, "")


class MessageConfig(_Strict):
    """One chat message; `content` is a Jinja2 template over the item's fields."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class RetryConfig(_Strict):
    """How long one item keeps trying before it is given up."""

    max_tries: int = Field(default=8, ge=1)
    max_time_s: float = Field(default=600, gt=0)
    first_wait_s: float = Field(default=0.5, ge=0)
    max_wait_s: float = Field(default=60, ge=0)


class PriceConfig(_Strict):
    """US dollars per million tokens."""

    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)
    cached_input_per_1m: float | None = Field(default=None, ge=0)


class CallConfig(_Strict):
    """The request sent for each item, and how requests are paced and retried."""

    model: str = Field(min_length=1)
    messages: list[MessageConfig] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    concurrency: int = Field(default=32, ge=1, le=10_000)
    timeout_s: float = Field(default=60, gt=0)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    base_url: str | None = None
    # the name results are kept under: a server that moves (a new host or port) keeps them
    endpoint_id: str | None = Field(default=None, min_length=1)
    api_key: str | None = None
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    expected_output_tokens: int | None = Field(default=None, gt=0)
    price: PriceConfig | None = None
    max_cost_usd: float | None = Field(default=None, gt=0)
    drain_s: float = Field(default=30, ge=0)
    stop_after_failures: int = Field(default=20, ge=0)  # in a row, the same way; 0: never
    max_response_bytes: int = Field(default=10_000_000, gt=0)
    # sent with every request, never stored nor part of a request's key: gateway tokens
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"'{name}' is not a valid header name")
            if not value.isascii() or not value.isprintable() or value != value.strip():
                raise ValueError(f"the value of '{name}' has characters a header cannot "
                                 "carry (line breaks, spaces around it, or non-ASCII)")
        return headers

    def secrets(self) -> list[str]:
        """The values of headers that carry credentials (`Authorization`, `api-key`,
        `*-key`, `*-token`, `*-secret`), with and without their scheme (`Bearer `)."""
        found = []
        for name, value in self.headers.items():
            lowered = name.lower()
            if "auth" in lowered or lowered == "api-key" or lowered.endswith(
                    ("-key", "-token", "-secret")):
                found += [value, value.partition(" ")[2]]
        return [secret for secret in found if secret]

    @field_validator("params")
    @classmethod
    def _no_reserved_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name in RESERVED_PARAMS:
            if name in params:
                hint = "set call.model instead" if name == "model" else "flow sets it itself"
                raise ValueError(f"'{name}' cannot be a param ({hint})")
        _check_json(params, "params")
        return params


class PipelineConfig(_Strict):
    """A whole pipeline file."""

    store: Path
    store_busy_timeout_s: float = Field(default=5, ge=0)
    # the longest one row's templates, or one reply's post steps, may take
    step_timeout_s: float = Field(default=10, gt=0)
    load: LoadConfig
    call: CallConfig
    post: list[str | dict[str, str]] = Field(default_factory=list)

    _file: Path = PrivateAttr(default=Path("pipeline.yaml"))

    @property
    def file(self) -> Path:
        """The pipeline file this config was read from."""
        return self._file

    @field_validator("post")
    @classmethod
    def _known_post_steps(cls, steps: list[str | dict[str, str]]) -> list[str | dict[str, str]]:
        for index, step in enumerate(steps):
            if isinstance(step, str):
                if step not in BUILTIN_POST_STEPS:
                    raise ValueError(
                        f"step {index}: unknown step '{step}'; expected one of "
                        f"{', '.join(BUILTIN_POST_STEPS)}, or a mapping with one of "
                        f"{', '.join(KEYED_POST_STEPS)}"
                    )
            elif len(step) != 1 or next(iter(step)) not in KEYED_POST_STEPS:
                raise ValueError(
                    f"step {index}: expected a mapping with exactly one key out of "
                    f"{', '.join(KEYED_POST_STEPS)}, got {sorted(step)}"
                )
        return steps


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
        raise ConfigError(f"{file}: expected a mapping of keys (store, load, call, post), got {got}")
    _count_values(raw, file)
    raw = _substitute_env(raw, file, ())
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe_errors(file, e)) from None
    base = file.resolve().parent
    config.store = base / config.store
    config.load.path = base / config.load.path
    config._file = file.resolve()
    if not config.load.resolved_format:
        raise ConfigError(
            f"{file}: load.path: cannot tell the format of '{config.load.path.name}'; "
            "name it .jsonl, .csv or .txt, or set load.format"
        )
    return config


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


def _check_json(value: Any, where: str) -> None:
    """A `ValueError` naming the first value in `value` that JSON cannot carry."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}, which JSON cannot carry")
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        raise ValueError(f"{where} is a {type(value).__name__} (a YAML !!{type(value).__name__}?),"
                         " which JSON cannot carry; write it as a list or quote it as text")


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
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", None)
        model = inner[0] if inner else annotation
    fields = getattr(model, "model_fields", {})
    return sorted(fields)
