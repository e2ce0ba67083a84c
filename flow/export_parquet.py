"""Write a stage's results as Parquet: one typed column per field, in input order.

Columns: `id`, the input fields, `status`, `output`, `truncated`, `error_class`, `error`,
`prompt_tokens`, `completion_tokens`, `cost_usd`, then any stage output asked for by
`--fields` (`grade.output.grade`). A JSON-valued column (an input field, an output's key) gets
its type from one pass over the store first: integers, numbers, booleans or text when every
value is one of them, else the value's JSON text. The rows are then read in batches, each
written as one row group, so memory stays flat whatever the size of the store.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow.arrow import require_pyarrow
from flow.report import Database, sql_text

ROWS_PER_GROUP = 100_000
_KINDS = {frozenset({"integer"}): "int", frozenset({"integer", "real"}): "float",
          frozenset({"real"}): "float", frozenset({"true"}): "bool",
          frozenset({"false"}): "bool", frozenset({"true", "false"}): "bool",
          frozenset({"text"}): "text"}


@dataclass(frozen=True)
class JSONColumn:
    """A column read out of a JSON value: `source` (an SQL expression), at `path`."""

    name: str
    source: str  # `first.input`, or `results.output` of the chosen stage, or a lookup
    path: str
    stage: str  # the stage whose inputs or outputs hold it
    is_input: bool


def write_parquet(db: Database, out: Path, columns: Sequence[JSONColumn], first: str,
                  chosen: str, only: str | None) -> int:
    """Write the chosen stage's results over the first stage's items to `out`, atomically."""
    pa, pq = require_pyarrow("flow export to Parquet")
    kinds = [_kind(db, column) for column in columns]
    sql = _select(columns, kinds, first, chosen, only)
    types = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "text": pa.string(),
             "json": pa.string()}
    fields = ([pa.field("id", pa.string())]
              + [pa.field(c.name, types[k]) for c, k in zip(columns, kinds)]
              + [pa.field("status", pa.string()), pa.field("output", pa.string()),
                 pa.field("truncated", pa.bool_()), pa.field("error_class", pa.string()),
                 pa.field("error", pa.string()), pa.field("prompt_tokens", pa.int64()),
                 pa.field("completion_tokens", pa.int64()), pa.field("cost_usd", pa.float64())])
    schema = pa.schema(fields)
    is_bool = [f.type == pa.bool_() for f in fields]
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(handle)
    count = 0
    try:
        rows = db.execute(sql, (only,) if only else ())
        with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
            while batch := rows.fetchmany(ROWS_PER_GROUP):
                values = list(zip(*batch))[1:]  # the sort key first, left out
                arrays = [pa.array(_bools(v) if b else v, type=f.type)
                          for v, b, f in zip(values, is_bool, fields)]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                count += len(batch)
            if count == 0:
                writer.write_table(schema.empty_table())
        os.replace(temporary, out)
    except BaseException:
        os.unlink(temporary)
        raise
    return count


def _bools(values: Sequence[Any]) -> list[bool | None]:
    return [None if v is None else bool(v) for v in values]


def _kind(db: Database, column: JSONColumn) -> str:
    """What every stored value of the column is: int, float, bool, text, or json (mixed)."""
    value, table = ("input", "items") if column.is_input else ("output", "outputs")
    seen = frozenset(str(kind) for (kind,) in db.execute(
        f"SELECT DISTINCT json_type({value}, {sql_text(column.path)}) FROM {table} "
        "WHERE stage = ?", (column.stage,)).fetchall() if kind is not None) - {"null"}
    return _KINDS.get(seen, "json" if seen else "text")


# each kind's SQL type, which both engines read alike (SQLite by the name's affinity)
_CASTS = {"int": "BIGINT", "float": "DOUBLE PRECISION", "bool": "BOOLEAN"}


def _value(column: JSONColumn, kind: str) -> str:
    if kind == "json":
        return f"{column.source} -> {sql_text(column.path)}"
    value = f"{column.source} ->> {sql_text(column.path)}"
    return f"CAST({value} AS {_CASTS[kind]})" if kind in _CASTS else value


def _select(columns: Sequence[JSONColumn], kinds: Sequence[str], first: str, chosen: str,
            only: str | None) -> str:
    """Every item of the first stage with its result at the chosen stage (pending where it
    has not reached it), in input order."""
    extra = "".join(_value(c, k) + ", " for c, k in zip(columns, kinds))
    output = ("CASE json_type(results.output) WHEN 'text' THEN results.output ->> '$' "
              "ELSE results.output END")
    reached = (f"SELECT first.row, first.item_id, {extra}results.status, {output}, "
               "results.truncated, results.error_class, results.error, results.prompt_tokens, "
               "results.completion_tokens, results.cost_usd FROM results JOIN items AS first "
               f"ON first.stage = {sql_text(first)} AND first.item_id = results.item_id "
               f"WHERE results.stage = {sql_text(chosen)}"
               + (" AND results.status = ?" if only else ""))
    if chosen == first or only not in (None, "pending"):
        return reached + " ORDER BY 1"
    waiting_extra = "".join(
        ("NULL, " if c.source == "results.output" else _value(c, k) + ", ")
        for c, k in zip(columns, kinds))
    waiting = (f"SELECT first.row, first.item_id, {waiting_extra}'pending', NULL, 0, NULL, "
               f"NULL, 0, 0, 0.0 FROM items AS first WHERE first.stage = {sql_text(first)} "
               "AND NOT EXISTS (SELECT 1 FROM items AS here WHERE here.stage = "
               f"{sql_text(chosen)} AND here.item_id = first.item_id)")
    return f"{reached} UNION ALL {waiting} ORDER BY 1"
