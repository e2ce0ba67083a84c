"""Write a stage's results as Parquet: one typed column per field, in input order.

Columns: `id`, the input fields, `status`, `output`, `truncated`, `error_class`, `error`,
`prompt_tokens`, `completion_tokens`, `cost_usd`, then any stage output asked for by
`--fields` (`grade.output.grade`), and for an embeddings stage `embedding`: a fixed-size
list of float32 (a list, when vectors of several sizes are stored), copied from the stored
bytes without ever becoming Python floats. A JSON-valued column (an input field, an output's key) gets
its type from one pass over the store first: integers, numbers, booleans or text when every
value is one of them, else the value's JSON text. The rows are then read in batches, each
written as one row group, so memory stays flat whatever the size of the store.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow.arrow import require_pyarrow
from flow.report import Database
from flow.store.quoting import sql_text

ROWS_PER_GROUP = 100_000
GROUP_VECTOR_BYTES = 64_000_000  # vectors in one row group at most: 10,416 of 1,536 floats
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
                  chosen: str, only: str | None, dimensions: Sequence[int] = ()) -> int:
    """Write the chosen stage's results over the first stage's items to `out`, atomically;
    `dimensions`: the chosen stage makes vectors of these sizes, written in `embedding`."""
    pa, pq = require_pyarrow("flow export to Parquet")
    kinds = [_kind(db, column) for column in columns]
    sql = _select(columns, kinds, first, chosen, only, bool(dimensions))
    types = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "text": pa.string(),
             "json": pa.string()}
    fields = ([pa.field("id", pa.string())]
              + [pa.field(c.name, types[k]) for c, k in zip(columns, kinds)]
              + [pa.field("status", pa.string()), pa.field("output", pa.string()),
                 pa.field("truncated", pa.bool_()), pa.field("error_class", pa.string()),
                 pa.field("error", pa.string()), pa.field("prompt_tokens", pa.int64()),
                 pa.field("completion_tokens", pa.int64()), pa.field("cost_usd", pa.float64())])
    rows_per_group = ROWS_PER_GROUP
    if dimensions:
        fields.append(pa.field("embedding", vector_type(pa, dimensions)))
        rows_per_group = max(1, min(ROWS_PER_GROUP, GROUP_VECTOR_BYTES // (4 * max(dimensions))))
    schema = pa.schema(fields)
    is_bool = [f.type == pa.bool_() for f in fields]
    vectors = int(bool(dimensions))
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(handle)
    count = 0
    try:
        rows = db.execute(sql, (only,) if only else ())
        with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
            while batch := rows.fetchmany(rows_per_group):
                values = list(zip(*batch))[1:]  # the sort key first, left out
                arrays = [pa.array(_bools(v) if b else v, type=f.type)
                          for v, b, f in zip(values, is_bool, fields[:len(fields) - vectors])]
                if vectors:  # the last column
                    arrays.append(vector_array(pa, values[-1], fields[-1].type))
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                count += len(batch)
            if count == 0:
                writer.write_table(schema.empty_table())
        os.replace(temporary, out)
    except BaseException:
        os.unlink(temporary)
        raise
    return count


def vector_type(pa: Any, dimensions: Sequence[int]) -> Any:
    """A fixed-size list of float32 when every vector has one size, else a list."""
    if len(dimensions) == 1:
        return pa.list_(pa.float32(), dimensions[0])
    return pa.list_(pa.float32())


def vector_array(pa: Any, blobs: Sequence[bytes | None], kind: Any) -> Any:
    """Stored vectors (float32 bytes, None where an item has none) as one Arrow array,
    copied once, never through Python floats."""
    mask = pa.array([blob is None for blob in blobs])
    if pa.types.is_fixed_size_list(kind):
        size = kind.list_size
        data = b"".join(bytes(4 * size) if blob is None else blob for blob in blobs)
        flat = pa.Array.from_buffers(pa.float32(), len(blobs) * size, [None, pa.py_buffer(data)])
        return pa.FixedSizeListArray.from_arrays(flat, size, mask=mask)
    lengths = [0 if blob is None else len(blob) // 4 for blob in blobs]
    offsets = pa.array(list(itertools.accumulate(lengths, initial=0)), type=pa.int32())
    data = b"".join(blob for blob in blobs if blob is not None)
    flat = pa.Array.from_buffers(pa.float32(), sum(lengths), [None, pa.py_buffer(data)])
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


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
            only: str | None, vectors: bool = False) -> str:
    """Every item of the first stage with its result at the chosen stage (pending where it
    has not reached it), in input order; `vectors`: each one's stored vector last."""
    extra = "".join(_value(c, k) + ", " for c, k in zip(columns, kinds))
    vector = (", (SELECT vector FROM vectors WHERE vectors.response_id = results.response_id)"
              if vectors else "")
    output = ("CASE json_type(results.output) WHEN 'text' THEN results.output ->> '$' "
              "ELSE results.output END")
    reached = (f"SELECT first.row, first.item_id, {extra}results.status, {output}, "
               "results.truncated, results.error_class, results.error, results.prompt_tokens, "
               f"results.completion_tokens, results.cost_usd{vector} FROM results "
               "JOIN items AS first "
               f"ON first.stage = {sql_text(first)} AND first.item_id = results.item_id "
               f"WHERE results.stage = {sql_text(chosen)}"
               + (" AND results.status = ?" if only else ""))
    if chosen == first or only not in (None, "pending"):
        return reached + " ORDER BY 1"
    waiting_extra = "".join(
        ("NULL, " if c.source == "results.output" else _value(c, k) + ", ")
        for c, k in zip(columns, kinds))
    waiting = (f"SELECT first.row, first.item_id, {waiting_extra}'pending', NULL, 0, NULL, "
               f"NULL, 0, 0, 0.0{', NULL' if vectors else ''} FROM items AS first "
               f"WHERE first.stage = {sql_text(first)} "
               "AND NOT EXISTS (SELECT 1 FROM items AS here WHERE here.stage = "
               f"{sql_text(chosen)} AND here.item_id = first.item_id)")
    return f"{reached} UNION ALL {waiting} ORDER BY 1"
