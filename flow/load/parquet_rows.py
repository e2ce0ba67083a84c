"""Rows out of a Parquet file, streamed a row group at a time.

Only one record batch (a part of one row group) is decoded at once, so a file of millions of
rows reads in flat memory. Values become what JSON can hold, as the store keeps an item's
input as JSON: dates and times as ISO text, decimals as numbers, bytes as UTF-8 text. A value
JSON cannot hold (NaN, bytes that are not UTF-8) fails its row alone.
"""

from __future__ import annotations

import datetime
import decimal
import math
from collections.abc import Iterator
from typing import Any

from flow.arrow import require_pyarrow
from flow.config import LoadConfig
from flow.errors import RowError, SourceError
from flow.load.lines import Parsed

BATCH_ROWS = 1024  # rows decoded at once: small enough to keep wide rows in few MB
READ_BUFFER_BYTES = 1 << 20  # a column chunk is read through this buffer, never whole


def parquet_rows(config: LoadConfig) -> Iterator[Parsed]:
    """Each row's number (from 1), its fields or the reason it cannot be used."""
    parquet_file = open_parquet(config)
    number = 0
    with parquet_file:
        for batch in parquet_file.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
            for fields in batch.to_pylist():
                number += 1
                try:
                    yield number, {str(k): _json_value(v) for k, v in fields.items()}, None, None
                except ValueError as e:
                    yield number, None, RowError(f"{config.path.name} row {number}: {e}"), None


def count_parquet_rows(config: LoadConfig) -> int:
    """The rows the file holds, from its footer."""
    with open_parquet(config) as parquet_file:
        return int(parquet_file.metadata.num_rows)


def open_parquet(config: LoadConfig) -> Any:
    """The file opened as Parquet (its footer read); a `SourceError` when it is not one."""
    _, pq = require_pyarrow(f"load.path {config.path.name} (Parquet)")
    path = config.path
    if not path.exists():
        raise SourceError(f"{path}: input file not found (load.path)")
    if path.is_dir():
        raise SourceError(f"{path}: is a folder, expected a file (load.path)")
    try:
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
    except OSError as e:
        raise SourceError(f"{path}: cannot read input: {e}") from None
    except Exception as e:  # pyarrow raises ArrowInvalid for a file that is not Parquet
        raise SourceError(f"{path}: not a Parquet file ({e}); check load.path or set "
                          "load.format") from None


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
