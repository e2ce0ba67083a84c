"""The post stage: turn a response's text into the item's output, one step after another.

Built-in steps: `strip`, `lower`, `json` (parse; failure fails the item), `regex: PATTERN`
(the first group, or the whole match), and `python: package.module:function` for a user's
own code, which gets the value so far and returns the next one.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flow.bounded import OutOfTime, Stopped, bounded
from flow.endpoints.chat import CUT_SHORT
from flow.errors import ConfigError, PostError, SchemaError
from flow.keys import canonical_json, content_key
from flow.records import OutputRecord, Reply
from flow.schema import OutputSchema

Step = Callable[[Any], Any]


class PostProcessor:
    """The configured post steps, compiled once and applied to each response text."""

    def __init__(self, steps: list[str | dict[str, str]], base_dir: Path,
                 timeout_s: float = 10, on_truncated: str = "keep",
                 schema: OutputSchema | None = None) -> None:
        self._timeout_s = timeout_s
        self.schema = schema
        self._keep_truncated = on_truncated == "keep"
        self._steps: list[tuple[str, Step]] = [
            _compile(step, index, base_dir) for index, step in enumerate(steps)
        ]
        # `on_truncated: fail` makes other outputs of the same replies: posted again; so does
        # an edit of a `python:` step's module (its source is part of the fingerprint)
        code = [_source_key(step) for name, step in self._steps if name.startswith("python ")]
        extra = ({"on_truncated": on_truncated} if on_truncated != "keep" else {}) | \
            ({"code": code} if code else {}) | \
            ({"schema": schema.fingerprint} if schema is not None else {})
        self.fingerprint = content_key({"steps": steps, **extra} if extra else steps)

    def output_for(self, item_id: str, request_key: str, reply: Reply | None,
                   error_class: str | None, error: str | None,
                   attempts: int = 0) -> OutputRecord:
        """What an item becomes: the post steps' output of `reply`, or why it failed."""
        output = OutputRecord(item_id, request_key, "failed", self.fingerprint,
                              error_class=error_class, error=error, attempts=attempts)
        if reply is not None and reply.truncated and not self._keep_truncated:
            output.error_class = "ResponseError"
            output.error = f"{CUT_SHORT}; raise max_tokens and run again (call.on_truncated)"
        elif reply is not None:
            output.truncated = reply.truncated
            try:
                output.output = _json(bounded(self._timeout_s, self.apply, reply.text))
                output.status, output.error_class, output.error = "done", None, None
            except PostError as e:
                cut = ("the reply was cut short at max_tokens (finish_reason=length), and "
                       if reply.truncated else "")
                output.error_class, output.error = e.error_class, cut + str(e)
            except Stopped:
                output.error_class = "PostError"
                output.error = ("the run was stopped while the post steps ran on this reply; "
                                "the reply is kept: --retry-failed posts it again, unpaid")
            except OutOfTime:
                output.error_class = "PostError"
                output.error = (f"the post steps took longer than {self._timeout_s:g} s on "
                                "this reply (step_timeout_s)")
        if output.error is not None and not output.error.isascii():
            # a message quoting half a character would stop the store from writing it
            output.error = output.error.encode("utf-8", "replace").decode("utf-8")
        return output

    def mismatch(self, text: str) -> str | None:
        """How the reply breaks the stage's schema, in words; None when it matches (or the
        stage has none)."""
        if self.schema is None:
            return None
        try:
            value = _parse_json(text)
        except PostError as e:
            return f"the reply is {e}"
        return self.schema.check(value)

    def apply(self, text: str) -> Any:
        """The output for one response text; raises `PostError` naming the failed step
        (`SchemaError` when the reply does not match the stage's schema)."""
        value: Any = text
        if self.schema is not None:
            try:
                value = _parse_json(text)
            except PostError as e:
                raise SchemaError(f"the reply is {e}") from None
            if (mismatch := self.schema.check(value)) is not None:
                raise SchemaError(f"the reply does not match the schema: {mismatch}")
        for name, step in self._steps:
            try:
                value = step(value)
            except PostError as e:
                raise PostError(f"post step {name}: {e}") from None
            except Exception as e:  # a user's function may raise anything; it fails this item
                raise PostError(f"post step {name}: {type(e).__name__}: {e}") from None
        return value


def _json(value: Any) -> str:
    """An output as JSON text; a value JSON cannot hold fails its item, not the run."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        if not text.isascii():
            text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value, allow_nan=False)  # half a character, kept as \\u escape
    except (TypeError, ValueError, RecursionError) as e:
        raise PostError(f"post steps returned a {type(value).__name__} that is not JSON "
                        f"({e}); return str, int, finite float, bool, None, list or dict"
                        ) from None


def _compile(step: str | dict[str, str], index: int, base_dir: Path) -> tuple[str, Step]:
    if isinstance(step, str):
        builtins: dict[str, Step] = {"strip": _strip, "lower": _lower, "json": _parse_json}
        return step, builtins[step]
    (kind, argument), = step.items()
    where = f"post[{index}].{kind}"
    if kind == "regex":
        try:
            pattern = re.compile(argument, re.DOTALL)
        except re.error as e:
            raise ConfigError(f"{where}: invalid regular expression: {e}") from None
        return f"regex {argument!r}", lambda value: _search(pattern, value)
    return f"python {argument}", _import_function(argument, where, base_dir)


def _strip(value: Any) -> str:
    return _text(value).strip()


def _lower(value: Any) -> str:
    return _text(value).lower()


def _parse_json(value: Any) -> Any:
    text = _text(value).strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PostError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                        f"{text[:80]!r}") from None


def _search(pattern: re.Pattern[str], value: Any) -> str:
    match = pattern.search(_text(value))
    if match is None:
        raise PostError(f"no match in {_text(value)[:80]!r}")
    return match.group(1) if pattern.groups else match.group(0)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else canonical_json(value)


def _source_key(function: Step) -> str:
    """What a user's step is made of: its module's source (a helper beside the function may
    change what it returns), else the function's own, else its name."""
    module = inspect.getmodule(function)
    try:
        path = inspect.getsourcefile(module) if module is not None else None
        if path is not None:
            return content_key(Path(path).read_bytes().decode("utf-8", "replace"))
        return content_key(inspect.getsource(function))
    except (OSError, TypeError):
        return getattr(function, "__qualname__", repr(function))


def _import_function(target: str, where: str, base_dir: Path) -> Step:
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"{where}: expected 'package.module:function', got {target!r}")
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
        if getattr(module, "__file__", None):
            module = importlib.reload(module)  # the code as it is now, not as a run saw it
    except Exception as e:  # the user's module may fail to import in any way
        raise ConfigError(f"{where}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{where}: {module_name} has no function {function_name!r}")
    return function  # type: ignore[no-any-return]
