"""The load stage: stream rows out of a JSONL, CSV or text file, one at a time.

Nothing is read ahead: `read_rows` yields each row as it is parsed, so memory stays flat
whatever the size of the input. A malformed row is yielded with its error instead of fields;
the caller records it as a failed item and goes on. Row numbers are the file's line numbers
(for CSV, the line a record starts on), as a person sees them in an editor.
"""

from __future__ import annotations

import csv
import json
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flow.config import LoadConfig
from flow.errors import RowError, SourceError
from flow.open_files import is_out_of_files, out_of_files_hint

CHUNK_BYTES = 1 << 20


@dataclass(slots=True)
class Row:
    """One input row: its line number, its item id, and either fields or the reason it failed."""

    number: int
    item_id: str
    fields: dict[str, Any] | None
    error: RowError | None = None
    text: str | None = None  # the row as JSON, as read (JSONL): stored without serializing


def read_rows(config: LoadConfig) -> Iterator[Row]:
    """Yield every row of the input file in order; malformed rows carry a `RowError`."""
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "txt": _txt_rows}
    handle = _open(config.path)
    with handle:
        for number, fields, error, text in readers[config.resolved_format](handle, config):
            row = _identify(number, fields, error, config.id, config.path)
            row.text = text if row.fields is not None else None
            yield row


def count_rows(config: LoadConfig) -> int:
    """A fast count of the rows in the input: its lines (for CSV, less the header)."""
    lines = 0
    last = b"\n"
    with _open(config.path) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1
    if config.resolved_format == "csv":
        lines -= 1
    return max(lines, 0)


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise SourceError(f"{path}: input file not found (load.path)") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a folder, expected a file (load.path)") from None
    except OSError as e:
        reason = out_of_files_hint() if is_out_of_files(e) else e.strerror or e
        raise SourceError(f"{path}: cannot read input: {reason}") from None


_Parsed = tuple[int, dict[str, Any] | None, RowError | None, str | None]


def _identify(
    number: int, fields: dict[str, Any] | None, error: RowError | None, id_field: str | None,
    path: Path,
) -> Row:
    if id_field is None:
        return Row(number, str(number), fields, error)  # every id is a line number
    if error is not None or fields is None:
        return Row(number, generated_id(number), fields, error)
    value = fields.get(id_field)
    if value is None or value == "" or isinstance(value, (dict, list)):
        reason = "has no" if value is None or value == "" else "has a non-scalar"
        return Row(number, generated_id(number), None,
                   RowError(f"{path.name} row {number}: {reason} id field '{id_field}' (load.id)"))
    return Row(number, str(value), fields)


def generated_id(number: int, base: str = "") -> str:
    """The id flow gives a row whose own id cannot be used (`#row7`, or `x#row7` for a
    duplicate of `x`): never a bare number, so it does not take a real numeric id."""
    return f"{base}#row{number}"


def _read_line(handle: IO[bytes], number: int,
               config: LoadConfig) -> tuple[str, RowError | None] | None:
    """Line `number`, decoded (None at the end); one too long or not decodable carries an
    error, with what text could be made of it. A too-long line is skipped, never held whole."""
    limit = config.max_row_bytes
    raw = handle.readline(limit + 1)
    if not raw:
        return None
    name = config.path.name
    if len(raw) > limit and not raw.endswith(b"\n"):
        while (rest := handle.readline(CHUNK_BYTES)) and not rest.endswith(b"\n"):
            pass
        return "\n", RowError(f"{name} row {number}: longer than {limit} bytes "
                              "(load.max_row_bytes)")
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode(config.encoding), None
    except UnicodeDecodeError as e:
        return raw.decode(config.encoding, errors="replace"), RowError(
            f"{name} row {number}: not valid {config.encoding} (byte {e.start}); "
            "fix the file or set load.encoding")
    except LookupError:
        raise SourceError(f"load.encoding: unknown encoding '{config.encoding}'") from None


def _lines(handle: IO[bytes], config: LoadConfig) -> Iterator[tuple[int, str | None, RowError | None]]:
    """Decoded lines with their numbers; blank lines are skipped, bad ones carry an error."""
    number = 0
    while (line := _read_line(handle, number + 1, config)) is not None:
        number += 1
        text, error = line
        if error is not None:
            yield number, None, error
        elif (text := text.rstrip("\r\n")).strip():
            yield number, text, None


def _jsonl_rows(handle: IO[bytes], config: LoadConfig) -> Iterator[_Parsed]:
    for number, text, error in _lines(handle, config):
        if text is None:
            yield number, None, error, None
            continue
        try:
            fields = _DECODER.decode(text)
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


def _has_lone_surrogate(fields: dict[str, Any]) -> bool:
    """Whether a JSON value holds half of a surrogate pair, which no UTF-8 text can carry."""
    try:
        json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _txt_rows(handle: IO[bytes], config: LoadConfig) -> Iterator[_Parsed]:
    for number, text, error in _lines(handle, config):
        yield number, ({"text": text} if text is not None else None), error, None


def _csv_rows(handle: IO[bytes], config: LoadConfig) -> Iterator[_Parsed]:
    """CSV with a header row; a record may span lines inside quotes, up to a bound.

    A quoted field that is never closed, or runs over `load.max_row_lines` lines or
    `load.max_row_bytes` bytes, is a stray quote: its first line fails as a row error and
    reading starts again on the line after it, so one quote never swallows the file.
    """
    lines = _RawLines(handle, config)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except (csv.Error, _RunsOn) as e:
        raise SourceError(f"{config.path}: cannot read the CSV header: {e}") from None
    if lines.bad is not None:
        raise SourceError(f"{config.path}: the CSV header is not valid {config.encoding}")
    name = config.path.name
    while True:
        lines.start_record()
        start = lines.number + 1
        try:
            record = next(reader)
        except StopIteration:
            if not lines.record:
                return
            record = []  # the file ended inside a quoted field
        except (csv.Error, _RunsOn) as e:
            if len(lines.record) > 1:
                why = str(e) if isinstance(e, _RunsOn) else f"does not end a field ({e})"
                yield start, None, _stray_quote(name, start, why), None
                lines.read_again()
                reader = csv.reader(lines, strict=True)
            else:
                yield start, None, RowError(f"{name} row {start}: malformed CSV: {e}"), None
            continue
        if len(lines.record) > 1 and (len(record) != len(header) or lines.unclosed()):
            yield start, None, _stray_quote(name, start, "it is never closed"), None
            lines.read_again()
            reader = csv.reader(lines, strict=True)
        elif lines.bad is not None:
            yield start, None, lines.bad, None
        elif not any(record):
            continue
        elif len(record) != len(header):
            yield start, None, RowError(
                f"{name} row {start}: {len(record)} fields, the header has {len(header)}"), None
        else:
            yield start, dict(zip(header, record)), None, None


def _stray_quote(name: str, start: int, why: str) -> RowError:
    return RowError(f"{name} row {start}: a quoted field opens here and {why}; check for a "
                    "stray quote (the lines after it are read as rows of their own)")


class _RunsOn(Exception):
    """A CSV record runs past `load.max_row_lines` lines or `load.max_row_bytes` bytes."""


class _RawLines:
    """Feeds decoded lines to `csv.reader`, remembering the last bad line instead of raising,
    and the lines of the record being read, so that they can be read again."""

    def __init__(self, handle: IO[bytes], config: LoadConfig) -> None:
        self.handle = handle
        self.config = config
        self.number = 0  # the number of the last line handed out
        self.bad: RowError | None = None
        self.record: list[tuple[int, str]] = []
        self._size = 0
        self._read = 0  # lines read from the file
        self._again: deque[tuple[int, str]] = deque()

    def __iter__(self) -> _RawLines:
        return self

    def __next__(self) -> str:
        if self._again:
            self.number, text = self._again.popleft()
        else:
            line = _read_line(self.handle, self._read + 1, self.config)
            if line is None:
                raise StopIteration
            self._read += 1
            self.number = self._read
            text, error = line
            if error is not None:
                self.bad = error
        self.record.append((self.number, text))
        self._size += len(text)
        if len(self.record) > self.config.max_row_lines:
            raise _RunsOn(f"it runs over {self.config.max_row_lines} lines (load.max_row_lines)")
        if self._size > self.config.max_row_bytes:
            raise _RunsOn(f"it runs over {self.config.max_row_bytes} bytes (load.max_row_bytes)")
        return text

    def start_record(self) -> None:
        """A new record begins with the next line."""
        self.record.clear()
        self._size = 0
        self.bad = None

    def read_again(self) -> None:
        """Hand out the record's lines after its first once more, as records of their own."""
        self._again.extendleft(reversed(self.record[1:]))
        self.number = self.record[0][0]

    def unclosed(self) -> bool:
        """Whether the record's quotes are unbalanced: it ended inside a quoted field."""
        return sum(text.count('"') for _, text in self.record) % 2 == 1
