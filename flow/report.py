"""Read a store: status counts, failures, one item in full, and exports.

These open the store read-only with the standard `sqlite3` module, so they work while a run
is writing (WAL readers never block the writer) and on a read-only mount, and never change
what they read. They read only what `docs/store.md` documents (the `results` view and the
tables beneath it), the same SQL a person would write.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from flow.errors import ConfigError, StoreError
from flow.records import STAGE
from flow.store.read_only import read_only_uri

EXPORT_FORMATS = ("jsonl", "csv")
EXPORT_COLUMNS = ("id", "status", "output", "truncated", "error_class", "error")


@contextmanager
def _open_read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """The store at `path`, read-only; a clear error when there is none yet."""
    if not path.exists():
        raise StoreError(f"{path}: no store yet; run the pipeline first")
    uri = read_only_uri(path)
    try:
        db = sqlite3.connect(uri, uri=True)
        db.execute("PRAGMA mmap_size=4294967296")
        db.execute("SELECT 1 FROM items LIMIT 1")
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read the store: {e}") from None
    try:
        db.execute("SELECT 1 FROM outputs LIMIT 1")
    except sqlite3.Error:
        db.close()
        raise StoreError(f"{path}: written by an older flow; `flow run` the pipeline once "
                         "to upgrade the store (finished items are not called again)") from None
    try:
        yield db
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read the store: {e}") from None
    finally:
        db.close()


def store_status(path: Path) -> dict[str, Any]:
    """Counts by status and error class, tokens and cost, and the history of runs.

    Money is read from `responses`, where each paid reply is counted once: the runs' cost,
    the budget cap and the total here are the same sum. The part of it that bought the
    current results is the sum of the `results` view's `cost_usd`; the rest paid for
    requests no item renders any more (an edited template, a re-bought reply).
    """
    with _open_read_only(path) as db:
        by_status: dict[str, int] = {}
        by_error: dict[str, int] = {}
        results_cost = 0.0
        # one pass over the view; `stage` lets SQLite read items through a covering index
        for status, error_class, count, cost in db.execute(
                "SELECT status, error_class, COUNT(*), SUM(cost_usd) FROM results "
                f"WHERE stage = '{STAGE}' GROUP BY 1, 2"):
            by_status[status] = by_status.get(status, 0) + count
            results_cost += cost or 0.0
            if status == "failed":
                by_error[error_class] = by_error.get(error_class, 0) + count
        by_error = dict(sorted(by_error.items(), key=lambda item: -item[1]))
        (truncated,) = db.execute("SELECT COUNT(*) FROM outputs "
                                  "WHERE stage = ? AND truncated", (STAGE,)).fetchone()
        origins = dict(db.execute(
            f"SELECT origin, COUNT(*) FROM results WHERE stage = '{STAGE}' AND status = 'done' "
            "GROUP BY origin").fetchall())
        prompt, completion, cost, replies = db.execute(
            "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(cost_usd), 0), COUNT(*) FROM responses").fetchone()
        runs = [dict(zip(("id", "started_at", "finished_at", "state", "origin", "items_done",
                          "items_failed", "items_skipped", "calls_made", "cost_usd"), row))
                for row in db.execute(
                    "SELECT id, started_at, finished_at, state, origin, items_done, "
                    "items_failed, items_skipped, calls_made, cost_usd FROM runs ORDER BY id")]
    counts = {status: by_status.get(status, 0) for status in ("done", "failed", "pending")}
    return {"store": str(path), "items": sum(by_status.values()), **counts,
            "failed_by_error_class": by_error, "done_by_origin": origins,
            "truncated": truncated,
            "tokens": {"prompt": prompt, "completion": completion},
            "cost_usd": round(cost, 6), "cost_of_results_usd": round(results_cost, 6),
            "replies_paid": replies,
            "attempts": sum(run["calls_made"] for run in runs), "runs": runs}


def list_failures(path: Path, error_class: str | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """Failed items in input order, with error class, message and attempts."""
    where = " AND error_class=?" if error_class else ""
    sql = ("SELECT item_id, row, error_class, error, attempts FROM results "
           f"WHERE stage = '{STAGE}' AND status = 'failed'{where} ORDER BY row"
           + (f" LIMIT {int(limit)}" if limit else ""))
    with _open_read_only(path) as db:
        rows = db.execute(sql, (error_class,) if error_class else ()).fetchall()
    return [dict(zip(("id", "row", "error_class", "error", "attempts"), row)) for row in rows]


def show_item(path: Path, item_id: str) -> dict[str, Any]:
    """One item in full: input, the exact request, the raw reply, output, every attempt."""
    with _open_read_only(path) as db:
        found = db.execute(
            "SELECT items.stage, items.row, items.input, items.request_key, items.origin, "
            "results.status, results.output, results.error_class, results.error, "
            "results.response_id, results.cost_usd, results.truncated FROM items JOIN results "
            "ON results.stage = items.stage AND results.item_id = items.item_id "
            "WHERE items.item_id=? ORDER BY items.stage", (item_id,)).fetchone()
        if found is None:
            raise ConfigError(f"{path}: no item with id {item_id!r}")
        (stage, row, raw_input, key, origin, status, output, error_class, error, response_id,
         paid, truncated) = found
        item: dict[str, Any] = {"id": item_id, "stage": stage, "row": row,
                                "input": _loads(raw_input), "request_key": key,
                                "status": status, "output": _loads(output),
                                "truncated": bool(truncated),
                                "error_class": error_class, "error": error}
        reply = db.execute(
            "SELECT id, model, request, body, prompt_tokens, completion_tokens, cost_usd, "
            "attempts, latency_ms, started_at, finished_at, run_id FROM responses "
            "WHERE request_key=? AND origin=? AND (id=? OR ? IS NULL) ORDER BY id DESC LIMIT 1",
            (key, origin, response_id, response_id)).fetchone()
        if reply is not None:
            (reply_id, model, request, body, prompt, completion, cost, attempts, latency,
             started, finished, run_id) = reply
            item.update(model=model, request=_loads(request), response=_loads(body),
                        response_id=reply_id, tokens={"prompt": prompt, "completion": completion},
                        cost_usd=cost, paid_by_this_item=bool(paid) or cost in (None, 0),
                        latency_ms=latency, started_at=started, finished_at=finished)
        item["attempts"] = [
            dict(zip(("run", "number", "started_at", "latency_ms", "status_code",
                      "outcome", "error", "wait_s"), attempt))
            for attempt in db.execute(
                "SELECT run_id, number, started_at, latency_ms, status_code, outcome, "
                "error, wait_s FROM attempts WHERE request_key=? AND origin=? "
                "ORDER BY rowid", (key, origin))]
        if not item["attempts"] and reply is not None and attempts == 1:
            # a reply at its first attempt: its `responses` row says it all
            item["attempts"] = [{"run": run_id, "number": 1, "started_at": started,
                                 "latency_ms": latency, "status_code": 200, "outcome": "ok",
                                 "error": None, "wait_s": None}]
    return item


def export_results(path: Path, out: Path | None, stream: IO[str], fmt: str | None = None,
                   only: str | None = None, fields: list[str] | None = None,
                   with_input: bool = True, id_field: str | None = None) -> int:
    """Write one record per item in input order; to `out` atomically, else to `stream`.

    The format is `fmt`, or the one `out`'s suffix names (JSONL otherwise). Each record has
    the item's id, its input fields (`fields` only, when given; none without `with_input`),
    then status, output, error class and error. An input field named like one of those
    (or like `id`, when it is not the id field) comes out as `input.<name>`.
    """
    fmt = _export_format(fmt, out)
    if only not in (None, "done", "failed", "pending"):
        raise ConfigError(f"--only: expected done, failed or pending, got {only!r}")
    with _open_read_only(path) as db:
        if fields is None:
            fields = _input_fields(db) if with_input else []
        # the `id` column holds the id field already; no column twice
        fields = [f for f in dict.fromkeys(fields) if f != id_field]
        rows = db.execute(_export_sql(fmt, fields, only), (only,) if only else ())
        if out is None:
            return _write(rows, stream, fmt, fields)
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
                count = _write(rows, handle, fmt, fields)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, out)
        except BaseException:
            os.unlink(handle.name)
            raise
        return count


def _export_format(fmt: str | None, out: Path | None) -> str:
    """The format asked for, or the one the output file's suffix names."""
    named = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(
        out.suffix.lower() if out is not None else "")
    if fmt is None:
        return named or "jsonl"
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if named is not None and named != fmt:
        raise ConfigError(f"--format {fmt}, but -o {out} names a .{named} file; give one, or "
                          "the same format in both")
    return fmt


def _input_fields(db: sqlite3.Connection) -> list[str]:
    """The input's field names, in the order the first rows give them."""
    names: dict[str, None] = {}
    for (text,) in db.execute("SELECT input FROM items WHERE stage = ? AND input IS NOT NULL "
                              "ORDER BY row LIMIT 1000", (STAGE,)):
        value = _loads(text)
        if isinstance(value, dict):
            names.update(dict.fromkeys(map(str, value)))
    return list(names)


def _column(field: str) -> str:
    """An input field's name in the export: `input.<name>` when flow's columns have it."""
    return f"input.{field}" if field in EXPORT_COLUMNS else field


def _export_sql(fmt: str, fields: list[str], only: str | None) -> str:
    """Records built by SQLite itself: a million rows need no per-row work in Python."""
    paths = [_quote('$."' + f.replace('"', "") + '"') for f in fields]
    if fmt == "jsonl":
        # outputs are stored as JSON text: spliced in as they are, never parsed again
        extra = "".join(f" || ',' || {_quote(json.dumps(_column(f)))} || ':' || "
                        f"COALESCE(items.input -> {p}, 'null')" for f, p in zip(fields, paths))
        columns = (f"""'{{"id":' || json_quote(results.item_id){extra} || ',"status":"' || """
                   """results.status || '","output":' || COALESCE(results.output, 'null') || """
                   """',"truncated":' || CASE WHEN results.truncated THEN 'true' """
                   """ELSE 'false' END || """
                   """',"error_class":' || json_quote(results.error_class) || ',"error":' || """
                   """json_quote(results.error) || '}'""")
    else:
        extra = "".join(f"items.input ->> {p}, " for p in paths)
        columns = (f"results.item_id, {extra}results.status, "
                   "CASE json_type(results.output) WHEN 'text' THEN results.output ->> '$' "
                   "ELSE results.output END, CASE WHEN results.truncated THEN 'true' "
                   "ELSE 'false' END, results.error_class, results.error")
    join = (" JOIN items ON items.stage = results.stage AND items.item_id = results.item_id"
            if fields else "")
    return (f"SELECT {columns} FROM results{join} WHERE results.stage = '{STAGE}'" +
            (" AND results.status = ?" if only else "") + " ORDER BY results.row")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _write(rows: sqlite3.Cursor, stream: IO[str], fmt: str, fields: list[str]) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(["id", *map(_column, fields), "status", "output", "truncated",
                         "error_class", "error"])
        while batch := rows.fetchmany(10_000):
            writer.writerows(batch)
            count += len(batch)
        return count
    while batch := rows.fetchmany(10_000):
        stream.write("\n".join(line for (line,) in batch))
        stream.write("\n")
        count += len(batch)
    return count


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_json(value: Any) -> str:
    """Pretty JSON for people."""
    return json.dumps(value, indent=2, ensure_ascii=False)
