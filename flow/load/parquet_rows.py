"""Rows out of a Parquet file, streamed a row group at a time.

Only one record batch (a part of one row group) is decoded at once, by arro3-io, so a file of
millions of rows reads in flat memory (`flow.arrow`). Values become what JSON can hold, as the
store keeps an item's input as JSON: dates and times as ISO text, decimals as numbers, bytes
as UTF-8 text. A value JSON cannot hold (NaN, bytes that are not UTF-8) fails its row alone.
"""

from __future__ import annotations

import datetime
import decimal
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flow.arrow import require_parquet_reader
from flow.config import LoadConfig
from flow.errors import RowError, SourceError
from flow.load.lines import Parsed

BATCH_ROWS = 1024  # rows decoded at once: small enough to keep wide rows in few MB
MAGIC = b"PAR1"  # a Parquet file begins and ends with it
FOOTER_TAIL = 8  # the footer's length (4 bytes, little-endian), then MAGIC


def parquet_rows(config: LoadConfig) -> Iterator[Parsed]:
    """Each row's number (from 1), its fields or the reason it cannot be used."""
    number = 0
    for batch in _batches(config, BATCH_ROWS):
        names = batch.schema.names
        for values in zip(*(column.to_pylist() for column in batch.columns)):
            number += 1
            try:
                yield number, {str(k): _json_value(v) for k, v in zip(names, values)}, None, None
            except ValueError as e:
                yield number, None, RowError(f"{config.path.name} row {number}: {e}"), None


def count_parquet_rows(config: LoadConfig) -> int:
    """The rows the file holds, counted batch by batch as they are read (flat memory,
    wide rows too; a damaged page is found before anything is sent)."""
    return sum(batch.num_rows for batch in _batches(config, BATCH_ROWS))


def _batches(config: LoadConfig, rows: int) -> Iterator[Any]:
    """The file's record batches of `rows` rows, one decoded at a time; a `SourceError` for
    a file that is not Parquet or cannot be read, naming how far it got."""
    io = require_parquet_reader(f"load.path {config.path.name} (Parquet)")
    path = config.path
    _check_file(path)
    try:
        reader = io.read_parquet(path, batch_size=rows)
    except OSError as e:
        raise SourceError(f"{path}: cannot read input: {e}") from None
    except BaseException as e:  # arro3 panics on a footer it cannot parse
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise SourceError(f"{path}: not a Parquet file (its footer cannot be read); check "
                          "load.path or set load.format") from None
    done = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except Exception as e:  # a data page that cannot be decoded
            where = f" after row {done:,}" if done else ""
            raise SourceError(f"{path}: cannot read input{where}: {e}") from None
        done += batch.num_rows
        yield batch


def _check_file(path: Path) -> None:
    """A `SourceError` unless `path` is a file that begins and ends as Parquet does."""
    if not path.exists():
        raise SourceError(f"{path}: input file not found (load.path)")
    if path.is_dir():
        raise SourceError(f"{path}: is a folder, expected a file (load.path)")
    try:
        with path.open("rb") as handle:
            head = handle.read(len(MAGIC))
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - FOOTER_TAIL))
            tail = handle.read(FOOTER_TAIL)
    except OSError as e:
        raise SourceError(f"{path}: cannot read input: {e}") from None
    footer = int.from_bytes(tail[:4], "little") if len(tail) == FOOTER_TAIL else 0
    if (size < len(MAGIC) + FOOTER_TAIL or head != MAGIC or tail[4:] != MAGIC
            or not 0 < footer <= size - len(MAGIC) - FOOTER_TAIL):
        raise SourceError(f"{path}: not a Parquet file (it does not begin and end as one "
                          "does); check load.path or set load.format")


def _json_value(value: Any) -> Any:
    """`value` as JSON can hold it; `ValueError` when it cannot."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a number JSON can hold; write it as null")
        return value
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # a Parquet map arrives as a list of (key, value) pairs
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {str(k): _json_value(v) for k, v in value}
        return [_json_value(v) for v in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return _json_value(float(value))
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a binary value that is not UTF-8 text") from None
    raise ValueError(f"a value of type {type(value).__name__} JSON cannot hold")
