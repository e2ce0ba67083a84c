"""Write a store's results, one record per item in input order, as JSONL, CSV or Parquet.

Records are built by the database itself from the `results` view, so a million rows need no
per-row work in Python; the SQL is SQLite's, which a PostgreSQL store reads through the JSON
functions and operators of its `m005_sqlite_json` migration. A chain exports one stage (its
last, unless asked for another) over the items of its first stage: an item that has not
reached that stage yet is `pending` there. Besides input fields, `--fields` can take any stage's output (`answer.output`) or a JSON path into it
(`grade.output.grade`).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flow.config.store_url import StoreURL
from flow.errors import ConfigError
from flow.export_parquet import JSONColumn, write_parquet
from flow.records import STAGE
from flow.report import Database, json_or_text, open_read_only, stage_named
from flow.store.quoting import sql_text
from flow.vectors import EMBEDDING, VECTOR_OF_RESULT, VectorRows, vector_dimensions

EXPORT_FORMATS = ("jsonl", "csv", "parquet")
EXPORT_COLUMNS = ("id", "status", "output", "truncated", "error_class", "error")
EXPORT_STATUSES = ("done", "failed", "pending", "skipped")
OUTPUT = "output"  # `<stage>.output[.<key>...]` in --fields names a stage's output


@dataclass(frozen=True)
class _Field:
    """A field of the export: an input field, or a stage's output (a JSON path into it)."""

    name: str  # as asked for
    stage: str | None = None  # None for an input field
    path: str = "$"

    @property
    def column(self) -> str:
        """Its key or header: an input field named like flow's columns is `input.<name>`."""
        return _column(self.name) if self.stage is None else self.name


def export_results(path: Path | StoreURL, out: Path | None, stream: IO[str], fmt: str | None = None,
                   only: str | None = None, fields: list[str] | None = None,
                   with_input: bool = True, id_field: str | None = None,
                   stages: Sequence[str] = (STAGE,), stage: str | None = None,
                   flatten: bool = False) -> int:
    """Write one record per item in input order; to `out` atomically, else to `stream`.

    The format is `fmt`, or the one `out`'s suffix names (JSONL otherwise). Each record has
    the item's id, its input fields (`fields` only, when given; none without `with_input`),
    then status, output, error class and error of `stage` (the last stage by default). An
    input field named like one of those (or like `id`, when it is not the id field) comes
    out as `input.<name>`; a stage's output named in `fields` comes out under that name;
    `flatten` adds `<stage>.output.<key>` for each key of the stage's output objects.
    """
    fmt = _export_format(fmt, out)
    if only not in (None, *EXPORT_STATUSES):
        raise ConfigError(f"--only: expected done, failed, pending or skipped, got {only!r}")
    chosen = stages[-1] if stage is None else stage_named(stages, stage)
    with open_read_only(path) as db:
        if fields is None:
            fields = _input_fields(db, stages[0]) if with_input else []
        if flatten:
            fields = [*fields, *(f"{chosen}.{OUTPUT}.{key}" for key in _output_keys(db, chosen))]
        # the `id` column holds the id field already; no column twice
        picked = [_field(f, stages) for f in dict.fromkeys(fields) if f != id_field]
        keyed = len(stages) > 1 or any(f.stage is not None for f in picked)
        dimensions = vector_dimensions(db, chosen)
        if fmt == "parquet":
            return _write_parquet(db, path, out, picked, only, stages[0], chosen, dimensions)
        sql = (_chain_export_sql(fmt, picked, only, stages[0], chosen, bool(dimensions))
               if keyed else
               _export_sql(fmt, [f.name for f in picked], only, chosen, bool(dimensions)))
        rows = db.execute(sql, (only,) if only else ())
        header = [f.column for f in picked]
        extra: list[str] = []
        if dimensions:
            rows, extra = VectorRows(rows, fmt), [EMBEDDING]
        if out is None:
            return _write(rows, stream, fmt, header, keyed, extra)
        if out.is_dir():
            raise ConfigError(f"-o {out}: is a folder; name the file to write")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            # closed by the `with` below, then renamed into place
            handle = tempfile.NamedTemporaryFile(  # noqa: SIM115
                "w", encoding="utf-8", dir=out.parent, prefix=f".{out.name}.", delete=False,
                newline="")
        except OSError as e:
            raise ConfigError(f"-o {out}: cannot write there: {e.strerror or e}") from None
        try:
            with handle:
                count = _write(rows, handle, fmt, header, keyed, extra)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, out)
        except BaseException:
            os.unlink(handle.name)
            raise
        return count


def _write_parquet(db: Database, path: Path | StoreURL, out: Path | None, picked: list[_Field],
                   only: str | None, first: str, chosen: str, dimensions: list[int]) -> int:
    """Parquet: to a file only."""
    if out is None:
        raise ConfigError("--format parquet: Parquet is written to a file; name it with -o")
    if out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; name the file to write")
    columns = [
        JSONColumn(f.column, "first.input", _input_path(f.name), first, True) if f.stage is None
        else JSONColumn(f.column, "results.output", f.path, chosen, False) if f.stage == chosen
        else JSONColumn(f.column, "(SELECT output FROM results AS earlier WHERE earlier.stage = "
                        f"{sql_text(f.stage)} AND earlier.item_id = first.item_id)", f.path,
                        f.stage, False)
        for f in picked]
    try:
        return write_parquet(db, out, columns, first, chosen, only, dimensions)
    except OSError as e:
        raise ConfigError(f"-o {out}: cannot write there: {e.strerror or e}") from None


def _field(name: str, stages: Sequence[str]) -> _Field:
    """`answer.output` or `answer.output.a.b` names a stage's output; anything else, input."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] in stages and parts[1] == OUTPUT:
        if not all(parts[2:]):
            raise ConfigError(f"--fields: {name!r} has an empty key; write "
                              f"{parts[0]}.{OUTPUT} or {parts[0]}.{OUTPUT}.<key>")
        return _Field(name, parts[0], "$" + "".join(_key(part) for part in parts[2:]))
    return _Field(name)


def _key(name: str) -> str:
    return '."' + name.replace('"', "") + '"'


def _export_format(fmt: str | None, out: Path | None) -> str:
    """The format asked for, or the one the output file's suffix names."""
    named = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(
        out.suffix.lower() if out is not None else "")
    if fmt is None:
        return named or "jsonl"
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if named is not None and named != fmt:
        raise ConfigError(f"--format {fmt}, but -o {out} names a .{named} file; give one, or "
                          "the same format in both")
    return fmt


def _input_fields(db: Database, stage: str) -> list[str]:
    """The input's field names, in the order the first rows give them."""
    names: dict[str, None] = {}
    for (text,) in db.execute("SELECT input FROM items WHERE stage = ? AND input IS NOT NULL "
                              "ORDER BY row LIMIT 1000", (stage,)):
        value = json_or_text(text)
        if isinstance(value, dict):
            names.update(dict.fromkeys(map(str, value)))
    return list(names)


def _output_keys(db: Database, stage: str) -> list[str]:
    """The keys of a stage's output objects, in the order the first done ones give them."""
    names: dict[str, None] = {}
    for (text,) in db.execute("SELECT output FROM outputs WHERE stage = ? AND status = 'done' "
                              "LIMIT 1000", (stage,)):
        value = json_or_text(text)
        if isinstance(value, dict):
            names.update(dict.fromkeys(map(str, value)))
    return [name for name in names if name and "." not in name and '"' not in name]


def _column(field: str) -> str:
    """An input field's name in the export: `input.<name>` when flow's columns have it."""
    return f"input.{field}" if field in EXPORT_COLUMNS else field


def _export_sql(fmt: str, fields: list[str], only: str | None, stage: str,
                vectors: bool = False) -> str:
    """One stage and input fields only: its `results` in input order; `vectors`: each
    one's stored vector last."""
    paths = [sql_text(_input_path(f)) for f in fields]
    if fmt == "jsonl":
        # outputs are stored as JSON text: spliced in as they are, never parsed again
        extra = "".join(f" || ',' || {sql_text(json.dumps(_column(f)))} || ':' || "
                        f"COALESCE(items.input -> {p}, 'null')" for f, p in zip(fields, paths))
        columns = (f"""'{{"id":' || json_quote(results.item_id){extra} || ',"status":"' || """
                   """results.status || '","output":' || COALESCE(results.output, 'null') || """
                   """',"truncated":' || CASE WHEN results.truncated <> 0 THEN 'true' """
                   """ELSE 'false' END || """
                   """',"error_class":' || json_quote(results.error_class) || ',"error":' || """
                   """json_quote(results.error) || '}'""")
    else:
        extra = "".join(f"items.input ->> {p}, " for p in paths)
        columns = (f"results.item_id, {extra}results.status, "
                   "CASE json_type(results.output) WHEN 'text' THEN results.output ->> '$' "
                   "ELSE results.output END, CASE WHEN results.truncated <> 0 THEN 'true' "
                   "ELSE 'false' END, results.error_class, results.error")
    if vectors:
        columns += f", {VECTOR_OF_RESULT}"
    join = (" JOIN items ON items.stage = results.stage AND items.item_id = results.item_id"
            if fields else "")
    return (f"SELECT {columns} FROM results{join} WHERE results.stage = {sql_text(stage)}" +
            (" AND results.status = ?" if only else "") + " ORDER BY results.row")


def _chain_export_sql(fmt: str, fields: list[_Field], only: str | None, first: str,
                      chosen: str, vectors: bool = False) -> str:
    """A chain: every item of the first stage with the chosen stage's result, and pending
    where it has no row there yet; each record after its row number, the sort key.

    The rows the chosen stage has and the items it has not reached yet are each read in
    input order through an index, and merged by SQLite: a LEFT JOIN of the `results` view
    would materialize the whole view first.
    """
    vector, none = (f", {VECTOR_OF_RESULT}", ", NULL") if vectors else ("", "")
    reached = (f"SELECT items.row, {_chain_columns(fmt, fields, chosen, reached=True)}{vector} "
               f"FROM results JOIN items ON items.stage = {sql_text(first)} "
               f"AND items.item_id = results.item_id WHERE results.stage = {sql_text(chosen)}"
               + (" AND results.status = ?" if only else ""))
    if chosen == first or only not in (None, "pending"):
        return reached + " ORDER BY results.row"
    waiting = (f"SELECT items.row, {_chain_columns(fmt, fields, chosen, reached=False)}{none} "
               f"FROM items WHERE items.stage = {sql_text(first)} AND NOT EXISTS (SELECT 1 "
               f"FROM items AS here WHERE here.stage = {sql_text(chosen)} "
               "AND here.item_id = items.item_id)")
    return f"{reached} UNION ALL {waiting} ORDER BY 1"


def _chain_columns(fmt: str, fields: list[_Field], chosen: str, reached: bool) -> str:
    """A record's columns: from `results` where the item reached the chosen stage, else
    pending."""
    status, output, truncated, error_class, error = (
        ("results.status", "results.output", "results.truncated", "results.error_class",
         "results.error") if reached else ("'pending'", "NULL", "0", "NULL", "NULL"))
    values = [_value(fmt, f, "results.output" if reached else "NULL")
              if f.stage == chosen else _value(fmt, f) for f in fields]
    if fmt == "jsonl":
        extra = "".join(f" || ',' || {sql_text(json.dumps(f.column))} || ':' || "
                        f"COALESCE({value}, 'null')" for f, value in zip(fields, values))
        return (f"""'{{"id":' || json_quote(items.item_id){extra} || ',"status":"' || """
                f"""{status} || '","output":' || COALESCE({output}, 'null') || """
                f"""',"truncated":' || CASE WHEN {truncated} <> 0 THEN 'true' ELSE 'false' END || """
                f"""',"error_class":' || json_quote({error_class}) || ',"error":' || """
                f"""json_quote({error}) || '}}'""")
    text = (f"CASE json_type({output}) WHEN 'text' THEN {output} ->> '$' ELSE {output} END"
            if reached else "NULL")
    return (f"items.item_id, {''.join(value + ', ' for value in values)}{status}, {text}, "
            f"CASE WHEN {truncated} <> 0 THEN 'true' ELSE 'false' END, {error_class}, {error}")


def _value(fmt: str, f: _Field, output: str | None = None) -> str:
    """A field's value: JSON text for JSONL; for CSV text as it is, anything else as JSON,
    as `output` is. `output`: the column holding the stage's output, when the record is
    read from that stage's `results`; else it is looked up."""
    if f.stage is None:
        path = sql_text(_input_path(f.name))
        return f"items.input {'->' if fmt == 'jsonl' else '->>'} {path}"
    if output == "NULL":
        return output
    column, path = output or "earlier.output", sql_text(f.path)
    if fmt == "jsonl":
        value = column if f.path == "$" else f"{column} -> {path}"
    else:
        value = (f"CASE json_type({column}, {path}) WHEN 'text' THEN {column} ->> {path} "
                 f"ELSE {column} -> {path} END")
    if output is not None:
        return value
    # a lookup per item: a join would materialize the `results` view of that stage
    return (f"(SELECT {value} FROM results AS earlier WHERE earlier.stage = "
            f"{sql_text(f.stage)} AND earlier.item_id = items.item_id)")


def _input_path(name: str) -> str:
    return '$."' + name.replace('"', "") + '"'


def _write(rows: Any, stream: IO[str], fmt: str, header: list[str],
           keyed: bool, extra: Sequence[str] = ()) -> int:
    """Write the records; `keyed`: each row starts with its sort key, left out; `extra`:
    CSV columns after flow's own (`embedding`)."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(["id", *header, "status", "output", "truncated", "error_class", "error",
                         *extra])
        while batch := rows.fetchmany(10_000):
            writer.writerows((row[1:] for row in batch) if keyed else batch)
            count += len(batch)
        return count
    while batch := rows.fetchmany(10_000):
        stream.write("\n".join(row[-1] for row in batch) if keyed else
                     "\n".join(line for (line,) in batch))
        stream.write("\n")
        count += len(batch)
    return count
