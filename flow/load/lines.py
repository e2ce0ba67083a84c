"""Reading an input file line by line as bytes: bounded, decoded, numbered as an editor does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from flow.config import LoadConfig
from flow.errors import RowError, SourceError
from flow.open_files import is_out_of_files, out_of_files_hint

CHUNK_BYTES = 1 << 20
# a row as a reader gives it: its line, its fields or its error, and its JSON text as read
Parsed = tuple[int, dict[str, Any] | None, RowError | None, str | None]


def open_input(path: Path) -> IO[bytes]:
    try:
        # a large buffer: each refill is a system call that lets other threads take the
        # interpreter's lock, and the reader then waits to get it back
        return path.open("rb", buffering=CHUNK_BYTES)
    except FileNotFoundError:
        raise SourceError(f"{path}: input file not found (load.path)") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a folder, expected a file (load.path)") from None
    except OSError as e:
        reason = out_of_files_hint() if is_out_of_files(e) else e.strerror or e
        raise SourceError(f"{path}: cannot read input: {reason}") from None


def read_line(handle: IO[bytes], number: int,
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


def numbered_lines(handle: IO[bytes], config: LoadConfig) -> Iterator[tuple[int, str | None, RowError | None]]:
    """Decoded lines with their numbers; blank lines are skipped, bad ones carry an error."""
    number = 0
    while (line := read_line(handle, number + 1, config)) is not None:
        number += 1
        text, error = line
        if error is not None:
            yield number, None, error
        elif (text := text.rstrip("\r\n")).strip():
            yield number, text, None
