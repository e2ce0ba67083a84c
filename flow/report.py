"""Read a store: status counts, failures, one item in full, and exports.

These open the store read-only with the standard `sqlite3` module, so they work while a run
is writing (WAL readers never block the writer) and never change what they read.
"""

from __future__ import annotations

import csv
import io
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
        by_status = dict(db.execute("SELECT status, COUNT(*) FROM results GROUP BY status"))
        by_error = dict(db.execute(
            "SELECT error_class, COUNT(*) FROM results WHERE status='failed' "
            "GROUP BY error_class ORDER BY COUNT(*) DESC"))
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
    sql = ("SELECT item_id, row, error_class, error, attempts FROM results "
           "WHERE status='failed'" + (" AND error_class=?" if error_class else "") +
           " ORDER BY row" + (f" LIMIT {int(limit)}" if limit else ""))
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
            "prompt_tokens, completion_tokens, cost_usd, latency_ms, started_at, finished_at "
            "FROM calls WHERE request_key=? AND origin=?", (key, origin)).fetchone()
        if item_error_class is not None:
            item.update(status="failed", error_class=item_error_class, error=item_error)
        elif call is None:
            item["status"] = "pending"
        if call is not None:
            (status, model, request, response, output, error_class, error, attempts, prompt,
             completion, cost, latency, started, finished) = call
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
    return item


def export_results(path: Path, out: Path | None, stream: IO[str], fmt: str = "jsonl",
                   only: str | None = None, fields: list[str] | None = None) -> int:
    """Write one record per item in input order; to `out` atomically, else to `stream`."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if only not in (None, "done", "failed", "pending"):
        raise ConfigError(f"--only: expected done, failed or pending, got {only!r}")
    with open_store(path) as db:
        sql = ("SELECT results.item_id, results.status, results.output, results.error_class, "
               "results.error" + (", items.input" if fields else "") +
               " FROM results" +
               (" JOIN items ON items.stage=results.stage AND items.item_id=results.item_id"
                if fields else "") +
               (" WHERE results.status=?" if only else "") + " ORDER BY results.row")
        rows = db.execute(sql, (only,) if only else ())
        if out is None:
            return _write(rows, stream, fmt, fields or [])
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out.parent,
                                             prefix=f".{out.name}.", delete=False, newline="")
        try:
            with handle:
                count = _write(rows, handle, fmt, fields or [])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, out)
        except BaseException:
            os.unlink(handle.name)
            raise
        return count


def _write(rows: Iterator[tuple[Any, ...]], stream: IO[str], fmt: str, fields: list[str]) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(["id", *fields, "status", "output", "error_class", "error"])
        for item_id, status, output, error_class, error, *raw_input in rows:
            picked = _pick(raw_input, fields)
            value = _loads(output)
            shown = value if isinstance(value, str) or value is None else output
            writer.writerow([item_id, *(_csv_cell(picked.get(f)) for f in fields), status,
                             shown, error_class, error])
            count += 1
        return count
    dumps = json.dumps
    for item_id, status, output, error_class, error, *raw_input in rows:
        extra = ""
        if fields:
            picked = _pick(raw_input, fields)
            extra = "".join(f",{dumps(f)}:{dumps(picked.get(f), ensure_ascii=False)}"
                            for f in fields)
        stream.write(f'{{"id":{dumps(item_id)}{extra},"status":"{status}",'
                     f'"output":{output or "null"},"error_class":{dumps(error_class)},'
                     f'"error":{dumps(error, ensure_ascii=False)}}}\n')
        count += 1
    return count


def _pick(raw_input: list[Any], fields: list[str]) -> dict[str, Any]:
    if not fields or not raw_input or raw_input[0] is None:
        return {}
    parsed = json.loads(raw_input[0])
    return {f: parsed.get(f) for f in fields}


def _csv_cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value)


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_json(value: Any) -> str:
    """Pretty JSON for people."""
    buffer = io.StringIO()
    json.dump(value, buffer, indent=2, ensure_ascii=False)
    return buffer.getvalue()
