"""The pipeline file: read YAML, substitute `${VAR}`, validate into typed config.

`load_config(path)` either returns a `PipelineConfig` or raises one `ConfigError` whose message
names the file, every offending key path and what was expected there.
"""

from __future__ import annotations

import difflib
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadConfig(_Strict):
    """Where the items come from."""

    path: Path
    id: str | None = None
    format: Literal["jsonl", "csv", "txt"] | None = None
    encoding: str = "utf-8"
    max_row_bytes: int = Field(default=1_000_000, gt=0)
    max_row_lines: int = Field(default=100, gt=0)  # a CSV record's, quoted line breaks

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
    api_key: str | None = None
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    expected_output_tokens: int | None = Field(default=None, gt=0)
    price: PriceConfig | None = None
    max_cost_usd: float | None = Field(default=None, gt=0)
    drain_s: float = Field(default=30, ge=0)
    max_response_bytes: int = Field(default=10_000_000, gt=0)

    @field_validator("params")
    @classmethod
    def _no_reserved_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name in RESERVED_PARAMS:
            if name in params:
                hint = "set call.model instead" if name == "model" else "flow sets it itself"
                raise ValueError(f"'{name}' cannot be a param ({hint})")
        return params


class PipelineConfig(_Strict):
    """A whole pipeline file."""

    store: Path
    store_busy_timeout_s: float = Field(default=5, ge=0)
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
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}: invalid YAML at {where}: {problem}") from None
    except Exception as e:  # yaml can raise plain ValueError/RecursionError on hostile input
        raise ConfigError(f"{file}: invalid YAML: {type(e).__name__}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{file}: expected a mapping of keys (store, load, call, post), got {got}")
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
