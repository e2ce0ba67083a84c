"""The load stage: stream rows out of a JSONL, CSV, text or Parquet file, one at a time.

Nothing is read ahead: `read_rows` yields each row as it is parsed, so memory stays flat
whatever the size of the input. A malformed row is yielded with its error instead of fields;
the caller records it as a failed item and goes on. Row numbers are the file's line numbers
(for CSV, the line a record starts on), as a person sees them in an editor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flow.config import LoadConfig
from flow.errors import RowError
from flow.load.csv_rows import csv_rows
from flow.load.lines import CHUNK_BYTES, Parsed, numbered_lines, open_input
from flow.load.parquet_rows import count_parquet_rows, parquet_rows


@dataclass(slots=True)
class Row:
    """One input row: its line number, its item id, and either fields or the reason it failed."""

    number: int
    item_id: str
    fields: dict[str, Any] | None
    error: RowError | None = None
    text: str | None = None  # the row as JSON, as read (JSONL): stored without serializing
    generated: bool = False  # its own id could not be read: flow names it (`#row7`)


def read_rows(config: LoadConfig) -> Iterator[Row]:
    """Yield every row of the input file in order; malformed rows carry a `RowError`."""
    if config.resolved_format == "parquet":
        yield from _rows_of(parquet_rows(config), config)
        return
    readers = {"jsonl": _jsonl_rows, "csv": csv_rows, "txt": _txt_rows}
    handle = open_input(config.path)
    with handle:
        yield from _rows_of(readers[config.resolved_format](handle, config), config)


def _rows_of(parsed: Iterator[Parsed], config: LoadConfig) -> Iterator[Row]:
    for number, fields, error, text in _with_types(parsed, config):
        row = _identify(number, fields, error, config.id, config.path)
        row.text = text if row.fields is not None else None
        yield row


_TRUE, _FALSE = ("true", "yes", "1", "y", "t"), ("false", "no", "0", "n", "f")


def _with_types(parsed: Iterator[Parsed], config: LoadConfig) -> Iterator[Parsed]:
    """Rows with the fields `load.types` names converted; a value not of its type fails
    its row. Without types, the rows as they are (no generator between)."""
    return _typed_rows(parsed, config) if config.types else parsed


def _typed_rows(parsed: Iterator[Parsed], config: LoadConfig) -> Iterator[Parsed]:
    for number, fields, error, text in parsed:
        if fields is None or error is not None:
            yield number, fields, error, text
            continue
        try:
            typed = _typed(fields, config.types)
        except ValueError as e:
            yield number, None, RowError(f"{config.path.name} row {number}: {e}"), None
            continue
        # a converted JSONL row is stored as converted, not as read
        yield number, typed, None, text if typed == fields else None


def _typed(fields: dict[str, Any], types: Mapping[str, str]) -> dict[str, Any]:
    """The fields with those named in `load.types` converted from text; an empty value is
    null. A value that is not of its type raises `ValueError` naming the field."""
    typed = dict(fields)
    for name, kind in types.items():
        value = typed.get(name)
        if not isinstance(value, str) or kind == "str":
            continue
        text = value.strip()
        try:
            if not text:
                typed[name] = None
            elif kind == "int":
                typed[name] = int(text)
            elif kind == "float":
                typed[name] = _finite_float(text)
            elif kind == "json":
                typed[name] = _DECODER.decode(text)
            elif text.lower() in _TRUE + _FALSE:
                typed[name] = text.lower() in _TRUE
            else:
                raise ValueError
        except (ValueError, RecursionError):
            raise ValueError(f"{name}: {value[:40]!r} is not {'an' if kind == 'int' else 'a'} "
                             f"{kind} (load.types)") from None
    return typed


def count_rows(config: LoadConfig) -> int:
    """A fast count of the rows in the input: its lines (for CSV, less the header), or
    a Parquet file's rows, read batch by batch."""
    if config.resolved_format == "parquet":
        return count_parquet_rows(config)
    lines = 0
    last = b"\n"
    with open_input(config.path) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1
    if config.resolved_format == "csv":
        lines -= 1
    return max(lines, 0)




def _identify(
    number: int, fields: dict[str, Any] | None, error: RowError | None, id_field: str | None,
    path: Path,
) -> Row:
    if id_field is None:
        return Row(number, str(number), fields, error)  # every id is a line number
    if error is not None or fields is None:
        return Row(number, generated_id(number), fields, error, generated=True)
    value = fields.get(id_field)
    if value is None or value == "" or isinstance(value, (dict, list)):
        reason = "has no" if value is None or value == "" else "has a non-scalar"
        return Row(number, generated_id(number), None,
                   RowError(f"{path.name} row {number}: {reason} id field '{id_field}' (load.id)"),
                   generated=True)
    return Row(number, str(value), fields)


def generated_id(number: int, base: str = "") -> str:
    """The id flow gives a row whose own id cannot be used (`#row7`, or `x#row7` for a
    duplicate of `x`): never a bare number, so it does not take a real numeric id."""
    return f"{base}#row{number}"


def _jsonl_rows(handle: IO[bytes], config: LoadConfig) -> Iterator[Parsed]:
    for number, text, error in numbered_lines(handle, config):
        if text is None:
            yield number, None, error, None
            continue
        try:
            fields = _loads(text)
        except _NotFinite as e:
            yield number, None, RowError(
                f"{config.path.name} row {number}: {e} is not a number JSON can hold "
                "(NaN, Infinity or out of range); write it as a string or null"), None
            continue
        except json.JSONDecodeError as e:
            yield number, None, RowError(
                f"{config.path.name} row {number}: invalid JSON at column {e.colno}: {e.msg}"), None
            continue
        except RecursionError:
            yield number, None, RowError(
                f"{config.path.name} row {number}: JSON nested too deeply"), None
            continue
        if not isinstance(fields, dict):
            yield number, None, RowError(
                f"{config.path.name} row {number}: expected a JSON object, "
                f"got {type(fields).__name__}"), None
            continue
        if "\\u" in text and _has_lone_surrogate(fields):
            yield number, None, RowError(
                f"{config.path.name} row {number}: a \\uD800-\\uDFFF escape without its "
                "other half (half a character, such as half an emoji); fix the row"), None
            continue
        yield number, fields, None, text


class _NotFinite(ValueError):
    """A JSON row holds NaN, Infinity or a number beyond a float."""


def _no_constant(name: str) -> Any:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


# built once: json.loads with options builds a decoder per call
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
# the C scanner `decode` calls after skipping whitespace (set on the instance, untyped)
_SCAN: Callable[[str, int], tuple[Any, int]] = vars(_DECODER)["scan_once"]


def _loads(text: str) -> Any:
    """The JSON value `text` holds, as `_DECODER.decode` reads it, in a third of its time
    for a row with nothing around its value (the usual JSONL row): the decoder's scanner is
    called at once, and the full decoder, which skips whitespace and says what is wrong,
    only when the scanner did not read the whole text."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:  # no value at the first character (whitespace, or not JSON)
        end = -1
    return value if end == len(text) else _DECODER.decode(text)


def _has_lone_surrogate(fields: dict[str, Any]) -> bool:
    """Whether a JSON value holds half of a surrogate pair, which no UTF-8 text can carry."""
    try:
        json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _txt_rows(handle: IO[bytes], config: LoadConfig) -> Iterator[Parsed]:
    for number, text, error in numbered_lines(handle, config):
        yield number, ({"text": text} if text is not None else None), error, None


