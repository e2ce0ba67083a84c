"""CSV rows: a header, then records that may span lines inside quotes, up to a bound."""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator
from typing import IO

from flow.config import LoadConfig
from flow.errors import RowError, SourceError
from flow.load.lines import Parsed, read_line


def csv_rows(handle: IO[bytes], config: LoadConfig) -> Iterator[Parsed]:
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
            line = read_line(self.handle, self._read + 1, self.config)
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
