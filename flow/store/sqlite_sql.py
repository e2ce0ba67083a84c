"""The SQL the SQLite store runs, built as plain values away from its connection.

A group commit is one hop to the connection's thread for the whole transaction: aiosqlite
sends each statement there and back, and BEGIN, three INSERTs and COMMIT as five round
trips cost a tenth of the throughput.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flow.errors import StoreError
from flow.open_files import is_out_of_files, out_of_files_hint
from flow.records import Settled

MAX_VARIABLES = 32_000  # SQLite allows 32,766 bound values per statement since 3.32


Statement = tuple[str, list[Any]]


@dataclass(slots=True)
class GroupRows:
    """The rows a group of settled calls adds, as plain values, and the replies whose payer
    is to be chosen again; each store writes them in its own SQL."""

    responses: list[tuple[Any, ...]] = field(default_factory=list)
    attempts: list[tuple[Any, ...]] = field(default_factory=list)
    outputs: list[tuple[Any, ...]] = field(default_factory=list)
    reassign: list[int] = field(default_factory=list)
    vectors: list[tuple[Any, ...]] = field(default_factory=list)  # (response id, dims, bytes)


def group_rows(group: list[Settled], run_id: int, ids: Iterator[int]) -> GroupRows:
    """The rows of a group of settled calls, each reply numbered by the next of `ids`, so
    outputs can name the reply they were made from in the same transaction."""
    rows = GroupRows()
    for settled in group:
        response = settled.response
        if response is not None:
            response.id = next(ids)
            usage = response.usage
            rows.responses.append((
                response.id, response.request_key, response.origin, response.model,
                response.request_json, response.body, usage.prompt_tokens,
                usage.completion_tokens, usage.cached_tokens, response.cost_usd,
                response.attempts, response.latency_ms, response.started_at,
                response.finished_at, run_id, response.batch_id))
            if response.vector is not None:
                rows.vectors.append((response.id, len(response.vector) // 4, response.vector))
        # a reply at its first attempt is all in its `responses` row; writing that
        # attempt again cost a tenth of the throughput (the GIL, while binding its row)
        if response is None or len(settled.attempts) > 1:
            rows.attempts.extend(
                (settled.call_key, settled.origin, run_id, a.number, a.started_at,
                 a.latency_ms, a.status_code, a.outcome, a.error, a.wait_s)
                for a in settled.attempts)
        for out in settled.outputs:
            if response is not None:
                out.response_id = response.id
            rows.outputs.append((
                settled.stage, out.item_id, out.request_key, settled.origin, out.status,
                out.output, out.post_key, out.error_class, out.error, out.response_id,
                out.bought, out.attempts, settled.finished_at, run_id, out.truncated))
    rows.reassign = sorted({reply for settled in group for reply in settled.reassign})
    return rows


def group_statements(group: list[Settled], run_id: int,
                     first_id: int) -> tuple[list[Statement], int]:
    """The statements that commit a group of settled calls, and the next free reply id.

    The store numbers replies itself (one live run holds its lock), so outputs can name the
    reply they were made from in the same transaction. Built here, on the event loop: any
    Python work on the writer's thread holds the GIL, and the loop then waits out the
    switch interval to get it back (a fifth of the throughput, measured).
    """
    ids = itertools.count(first_id)
    rows = group_rows(group, run_id, ids)
    statements = [
        *inserts("INSERT INTO responses (id, request_key, origin, model, request, body, "
                 "prompt_tokens, completion_tokens, cached_tokens, cost_usd, attempts, "
                 "latency_ms, started_at, finished_at, run_id, batch_id) VALUES", rows.responses),
        *inserts("INSERT INTO vectors (response_id, dimensions, vector) VALUES", rows.vectors),
        *inserts("INSERT INTO attempts (request_key, origin, run_id, number, started_at, "
                 "latency_ms, status_code, outcome, error, wait_s) VALUES", rows.attempts),
        *inserts("INSERT OR REPLACE INTO outputs (stage, item_id, request_key, origin, "
                 "status, output, post_key, error_class, error, response_id, bought, "
                 "attempts, finished_at, run_id, truncated) VALUES", rows.outputs)]
    if rows.reassign:
        statements.append(reassign_payer(rows.reassign))
    return statements, next(ids)


def reassign_payer(response_ids: list[int]) -> Statement:
    """Give each reply's cost to one current output made from it (`bought`), or to none.

    One item carries a reply's tokens and cost in `results`, so summing the view counts each
    payment once; when that item moves to another reply, or leaves, another takes it over
    (none, when no current item uses the reply any more).
    """
    marks = ", ".join("?" * len(response_ids))
    return (f"""
        UPDATE outputs SET bought = COALESCE(outputs.rowid = (
            SELECT MIN(current.rowid) FROM outputs AS current
            JOIN items ON items.stage = current.stage AND items.item_id = current.item_id
                AND items.request_key = current.request_key AND items.origin = current.origin
            WHERE current.response_id = outputs.response_id), 0)
        WHERE response_id IN ({marks})""", list(response_ids))


def inserts(head: str, rows: list[tuple[Any, ...]], tail: str = "") -> list[Statement]:
    """Statements inserting many rows, one multi-row VALUES per chunk.

    `executemany` binds and steps row by row; one multi-row VALUES is bound at once and
    stepped once.
    """
    if not rows:
        return []
    width = len(rows[0])
    size = max(1, MAX_VARIABLES // width)
    marks = "(" + ", ".join("?" * width) + ")"
    return [(f"{head} {', '.join([marks] * len(chunk))}{tail}",
             [value for row in chunk for value in row])
            for chunk in (rows[start:start + size] for start in range(0, len(rows), size))]


def run_in_transaction(db: sqlite3.Connection, statements: list[Statement]) -> None:
    """Run the statements in one transaction; on the connection's own thread."""
    db.execute("BEGIN")
    try:
        for sql, params in statements:
            db.execute(sql, params)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def fetch_all(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """The rows of one statement; on the connection's own thread."""
    return db.execute(sql, params).fetchall()


def known_sql(items: int, with_output: bool = False) -> str:
    """For `items` (item id, request key) pairs bound from ?3 on, with the stage as ?1 and
    the origin as ?2: each item's output, and its request's latest reply; `with_output`:
    the output's JSON and error last.

    An output already done for the same request needs no look into `responses` (a re-run
    over a million done items makes a million of these).
    """
    wanted = ", ".join(f"(?{3 + 2 * n}, ?{4 + 2 * n})" for n in range(items))
    output = ", outputs.output, outputs.error" if with_output else ""
    return f"""
        WITH wanted (item_id, request_key) AS (VALUES {wanted})
        SELECT wanted.item_id, outputs.request_key, outputs.post_key, outputs.status,
            outputs.error_class, outputs.response_id, outputs.bought,
            CASE WHEN outputs.request_key = wanted.request_key
                      AND outputs.status = 'done' THEN outputs.response_id
                 ELSE (SELECT MAX(id) FROM responses
                       WHERE responses.request_key = wanted.request_key
                         AND responses.origin = ?2) END{output}
        FROM wanted LEFT JOIN outputs ON outputs.stage = ?1
            AND outputs.item_id = wanted.item_id AND outputs.origin = ?2"""


def reconcile_sql(calls_made_given: bool) -> str:
    """A run's tokens and cost from the replies it stored; its attempts bound as the first
    parameter, or (after a crash) counted from what it left in the store."""
    counted = "?" if calls_made_given else (
        "(SELECT COUNT(*) FROM attempts WHERE run_id = runs.id) + "
        "(SELECT COUNT(*) FROM responses WHERE run_id = runs.id AND attempts = 1)")
    return ("UPDATE runs SET prompt_tokens = (SELECT COALESCE(SUM(prompt_tokens), 0) "
            "FROM responses WHERE run_id = runs.id), completion_tokens = (SELECT "
            "COALESCE(SUM(completion_tokens), 0) FROM responses WHERE run_id = runs.id), "
            "cost_usd = (SELECT COALESCE(SUM(cost_usd), 0) FROM responses "
            f"WHERE run_id = runs.id), calls_made = {counted} WHERE id = ?")


def store_error(path: Path, doing: str, error: Exception,
                busy_timeout_s: float = 5.0) -> StoreError:
    """A `StoreError` that says what happened to the store in words a person can act on."""
    text = str(error)
    if is_out_of_files(error):
        hint = out_of_files_hint()
    elif "locked" in text or "busy" in text:
        hint = ("another program (a sqlite3 shell, Datasette, a backup) has held a write lock "
                f"on it for more than {busy_timeout_s:g} s; close it and run again")
    elif "full" in text or "disk I/O error" in text:
        hint = ("the disk is full or refused the write; free some space (or check the disk) "
                "and run again")
    elif "readonly" in text or "read-only" in text:
        hint = "the store or its folder is read-only; make it writable or move `store:`"
    elif "malformed" in text or "not a database" in text:
        hint = "the file is not a flow store, or it is damaged"
    elif not isinstance(error, sqlite3.Error):
        hint = f"{type(error).__name__}: {text}"
    else:
        hint = text
    return StoreError(f"{path}: {doing}: {hint}; everything committed before is safe")


# what a run has read: the ids seen (to refuse duplicates), the rows held to be named last
SEEN_TABLES = (
    "CREATE TEMP TABLE IF NOT EXISTS seen_ids "
    "(item_id TEXT PRIMARY KEY, row INTEGER NOT NULL) WITHOUT ROWID",
    "DELETE FROM seen_ids",
    "CREATE TEMP TABLE IF NOT EXISTS held_rows "
    "(row INTEGER PRIMARY KEY, base TEXT NOT NULL, error_class TEXT, error TEXT)",
    "DELETE FROM held_rows")
HELD_SQL = ("SELECT row, base, error_class, error FROM held_rows WHERE row > ? ORDER BY row "
            "LIMIT ?")
UNSEEN = "stage=? AND item_id NOT IN (SELECT item_id FROM seen_ids)"
STAGE_ITEMS = "SELECT COUNT(*) FROM items WHERE stage = ?"
# the stages items are held at, a step of the index on (stage, row) each
ITEM_STAGES = """
    WITH RECURSIVE held(stage) AS (
        SELECT MIN(stage) FROM items
        UNION ALL SELECT (SELECT MIN(stage) FROM items WHERE stage > held.stage) FROM held
        WHERE held.stage IS NOT NULL)
    SELECT stage FROM held WHERE stage IS NOT NULL"""


def insert_seen_sql(count: int) -> str:
    """Mark `count` (item id, row) pairs seen; returns the ids that were not seen before."""
    return (f"INSERT INTO seen_ids VALUES {', '.join(['(?, ?)'] * count)} "
            "ON CONFLICT DO NOTHING RETURNING item_id")


def insert_held(rows: Sequence[tuple[int, str, str | None, str | None]]) -> Statement:
    """Hold rows to be named at the input's end."""
    return ("INSERT OR REPLACE INTO held_rows VALUES " + ", ".join(["(?, ?, ?, ?)"] * len(rows)),
            [value for held in rows for value in held])


# a run's row: begun, ended; runs left `running` by a dead process are `crashed`
CRASHED_SQL = ("UPDATE runs SET state='crashed', finished_at=COALESCE(finished_at, ?) "
               "WHERE state='running' RETURNING id")
NEW_RUN_SQL = ("INSERT INTO runs (pipeline, origin, endpoint, pid, started_at, state) "
               "VALUES (?, ?, ?, ?, ?, 'running')")
FINISH_RUN_SQL = ("UPDATE runs SET finished_at=?, state=?, message=?, items_total=?, "
                  "items_done=?, items_failed=?, items_skipped=?, commit_groups=?, "
                  "commit_wait_mean_ms=?, commit_wait_max_ms=? WHERE id=?")

