"""What the SQLite store writes, as plain functions run on the connection's own thread.

A group commit is one hop to that thread for the whole transaction: aiosqlite sends each
statement there and back, and BEGIN, three INSERTs and COMMIT as five round trips cost a
tenth of the throughput.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from flow.records import Settled

MAX_VARIABLES = 32_000  # SQLite allows 32,766 bound values per statement since 3.32


Statement = tuple[str, list[Any]]


def group_statements(group: list[Settled], run_id: int,
                     first_id: int) -> tuple[list[Statement], int]:
    """The statements that commit a group of settled calls, and the next free reply id.

    The store numbers replies itself (one live run holds its lock), so outputs can name the
    reply they were made from in the same transaction. Built here, on the event loop: any
    Python work on the writer's thread holds the GIL, and the loop then waits out the
    switch interval to get it back (a fifth of the throughput, measured).
    """
    responses: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    outputs: list[tuple[Any, ...]] = []
    next_id = first_id
    for settled in group:
        response = settled.response
        if response is not None:
            response.id = next_id
            next_id += 1
            usage = response.usage
            responses.append((
                response.id, response.request_key, response.origin, response.model,
                response.request_json, response.body, usage.prompt_tokens,
                usage.completion_tokens, usage.cached_tokens, response.cost_usd,
                response.attempts, response.latency_ms, response.started_at,
                response.finished_at, run_id))
        # a reply at its first attempt is all in its `responses` row; writing that
        # attempt again cost a tenth of the throughput (the GIL, while binding its row)
        if response is None or len(settled.attempts) > 1:
            attempts.extend(
                (settled.call_key, settled.origin, run_id, a.number, a.started_at,
                 a.latency_ms, a.status_code, a.outcome, a.error, a.wait_s)
                for a in settled.attempts)
        for out in settled.outputs:
            if response is not None:
                out.response_id = response.id
            outputs.append((
                settled.stage, out.item_id, out.request_key, settled.origin, out.status,
                out.output, out.post_key, out.error_class, out.error, out.response_id,
                out.bought, out.attempts, settled.finished_at, run_id))
    statements = [
        *inserts("INSERT INTO responses (id, request_key, origin, model, request, body, "
                 "prompt_tokens, completion_tokens, cached_tokens, cost_usd, attempts, "
                 "latency_ms, started_at, finished_at, run_id) VALUES", responses),
        *inserts("INSERT INTO attempts (request_key, origin, run_id, number, started_at, "
                 "latency_ms, status_code, outcome, error, wait_s) VALUES", attempts),
        *inserts("INSERT OR REPLACE INTO outputs (stage, item_id, request_key, origin, "
                 "status, output, post_key, error_class, error, response_id, bought, "
                 "attempts, finished_at, run_id) VALUES", outputs)]
    reassign = sorted({reply for settled in group for reply in settled.reassign})
    if reassign:
        statements.append(reassign_payer(reassign))
    return statements, next_id


def reassign_payer(response_ids: list[int]) -> Statement:
    """Give each reply's cost to one current output made from it (`bought`), or to none.

    One item carries a reply's tokens and cost in `results`, so summing the view counts each
    payment once; when that item moves to another reply, or leaves, another takes it over.
    """
    marks = ", ".join("?" * len(response_ids))
    return (f"""
        UPDATE outputs SET bought = (outputs.rowid = (
            SELECT MIN(current.rowid) FROM outputs AS current
            JOIN items ON items.stage = current.stage AND items.item_id = current.item_id
                AND items.request_key = current.request_key AND items.origin = current.origin
            WHERE current.response_id = outputs.response_id))
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
