"""Read a store: status counts, failures, one item in full, and exports.

These open the store read-only with the standard `sqlite3` module, so they work while a run
is writing (WAL readers never block the writer) and never change what they read.
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

EXPORT_FORMATS = ("jsonl", "csv")


@contextmanager
def open_store(path: Path) -> Iterator[sqlite3.Connection]:
    """The store at `path`, read-only; a clear error when there is none yet."""
    if not path.exists():
        raise StoreError(f"{path}: no store yet; run the pipeline first")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("PRAGMA mmap_size=4294967296")
        db.execute("SELECT 1 FROM items LIMIT 1")
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read the store: {e}") from None
    try:
        yield db
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read the store: {e}") from None
    finally:
        db.close()


def store_status(path: Path) -> dict[str, Any]:
    """Counts by status and error class, tokens and cost, and the history of runs."""
    with open_store(path) as db:
        by_status: dict[str, int] = {}
        by_error: dict[str, int] = {}
        for status, error_class, count in db.execute(
                "SELECT status, error_class, COUNT(*) FROM results GROUP BY 1, 2"):
            by_status[status] = by_status.get(status, 0) + count
            if status == "failed":
                by_error[error_class] = by_error.get(error_class, 0) + count
        by_error = dict(sorted(by_error.items(), key=lambda item: -item[1]))
        prompt, completion, cost, calls = db.execute(
            "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(cost_usd), 0), COALESCE(SUM(attempts), 0) FROM calls").fetchone()
        runs = [dict(zip(("id", "started_at", "finished_at", "state", "origin", "items_done",
                          "items_failed", "items_skipped", "calls_made", "cost_usd"), row))
                for row in db.execute(
                    "SELECT id, started_at, finished_at, state, origin, items_done, "
                    "items_failed, items_skipped, calls_made, cost_usd FROM runs ORDER BY id")]
    counts = {status: by_status.get(status, 0) for status in ("done", "failed", "pending")}
    return {"store": str(path), "items": sum(by_status.values()), **counts,
            "failed_by_error_class": by_error,
            "tokens": {"prompt": prompt, "completion": completion},
            "cost_usd": round(cost, 6), "attempts": calls, "runs": runs}


def list_failures(path: Path, error_class: str | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """Failed items in input order, with error class, message and attempts."""
    where = " AND error_class=?" if error_class else ""
    sql = (
        "SELECT item_id, row, error_class, error, attempts FROM ("
        " SELECT items.item_id, items.row, calls.error_class, calls.error, calls.attempts"
        " FROM calls JOIN items ON items.request_key = calls.request_key"
        "  AND items.origin = calls.origin AND items.error_class IS NULL"
        " WHERE calls.status = 'failed'"
        " UNION ALL"
        " SELECT item_id, row, error_class, error, NULL FROM items"
        " WHERE error_class IS NOT NULL)"
        f" WHERE 1{where} ORDER BY row" + (f" LIMIT {int(limit)}" if limit else ""))
    with open_store(path) as db:
        rows = db.execute(sql, (error_class,) if error_class else ()).fetchall()
    return [dict(zip(("id", "row", "error_class", "error", "attempts"), row)) for row in rows]


def show_item(path: Path, item_id: str) -> dict[str, Any]:
    """One item in full: input, the exact request, the raw response, output, every attempt."""
    with open_store(path) as db:
        found = db.execute(
            "SELECT stage, row, input, request_key, origin, error_class, error FROM items "
            "WHERE item_id=? ORDER BY stage", (item_id,)).fetchone()
        if found is None:
            raise ConfigError(f"{path}: no item with id {item_id!r}")
        stage, row, raw_input, key, origin, item_error_class, item_error = found
        item: dict[str, Any] = {"id": item_id, "stage": stage, "row": row,
                                "input": _loads(raw_input), "request_key": key}
        call = db.execute(
            "SELECT status, model, request, response, output, error_class, error, attempts, "
            "prompt_tokens, completion_tokens, cost_usd, latency_ms, started_at, finished_at, "
            "run_id FROM calls WHERE request_key=? AND origin=?", (key, origin)).fetchone()
        if item_error_class is not None:
            item.update(status="failed", error_class=item_error_class, error=item_error)
        elif call is None:
            item["status"] = "pending"
        if call is not None:
            (status, model, request, response, output, error_class, error, attempts, prompt,
             completion, cost, latency, started, finished, run_id) = call
            item.setdefault("status", status)
            item.update(model=model, request=_loads(request), response=_loads(response),
                        output=_loads(output), error_class=error_class, error=error,
                        tokens={"prompt": prompt, "completion": completion}, cost_usd=cost,
                        latency_ms=latency, started_at=started, finished_at=finished)
            item["attempts"] = [
                dict(zip(("run", "number", "started_at", "latency_ms", "status_code",
                          "outcome", "error", "wait_s"), attempt))
                for attempt in db.execute(
                    "SELECT run_id, number, started_at, latency_ms, status_code, outcome, "
                    "error, wait_s FROM attempts WHERE request_key=? AND origin=? "
                    "ORDER BY rowid", (key, origin))]
            if not item["attempts"] and status == "done" and response is not None:
                # done at the first attempt: the call's own row says it all
                item["attempts"] = [{"run": run_id, "number": 1, "started_at": started,
                                     "latency_ms": latency, "status_code": 200, "outcome": "ok",
                                     "error": None, "wait_s": None}]
    return item


def export_results(path: Path, out: Path | None, stream: IO[str], fmt: str = "jsonl",
                   only: str | None = None, fields: list[str] | None = None) -> int:
    """Write one record per item in input order; to `out` atomically, else to `stream`."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if only not in (None, "done", "failed", "pending"):
        raise ConfigError(f"--only: expected done, failed or pending, got {only!r}")
    fields = fields or []
    with open_store(path) as db:
        rows = db.execute(_export_sql(fmt, fields, only), (only,) if only else ())
        if out is None:
            return _write(rows, stream, fmt, fields)
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out.parent,
                                             prefix=f".{out.name}.", delete=False, newline="")
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


def _export_sql(fmt: str, fields: list[str], only: str | None) -> str:
    """Records built by SQLite itself: a million rows need no per-row work in Python."""
    paths = [_quote('$."' + f.replace('"', "") + '"') for f in fields]
    status = ("CASE WHEN items.error_class IS NOT NULL THEN 'failed' "
              "WHEN calls.status IS NULL THEN 'pending' ELSE calls.status END")
    error_class = "COALESCE(items.error_class, calls.error_class)"
    error = "COALESCE(items.error, calls.error)"
    if fmt == "jsonl":
        # outputs are stored as JSON text: spliced in as they are, never parsed again
        extra = "".join(f" || ',' || {_quote(json.dumps(f))} || ':' || "
                        f"COALESCE(items.input -> {p}, 'null')" for f, p in zip(fields, paths))
        columns = (f"""'{{"id":' || json_quote(items.item_id){extra} || ',"status":"' || """
                   f"""{status} || '","output":' || COALESCE(calls.output, 'null') || """
                   f"""',"error_class":' || json_quote({error_class}) || ',"error":' || """
                   f"""json_quote({error}) || '}}'""")
    else:
        extra = "".join(f"items.input ->> {p}, " for p in paths)
        columns = (f"items.item_id, {extra}{status}, "
                   "CASE json_type(calls.output) WHEN 'text' THEN calls.output ->> '$' "
                   f"ELSE calls.output END, {error_class}, {error}")
    return (f"SELECT {columns} FROM items LEFT JOIN calls ON calls.request_key = "
            "items.request_key AND calls.origin = items.origin WHERE items.stage = 'call'" +
            (f" AND {status} = ?" if only else "") + " ORDER BY items.row")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _write(rows: sqlite3.Cursor, stream: IO[str], fmt: str, fields: list[str]) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(["id", *fields, "status", "output", "error_class", "error"])
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
