"""The rows a SQLite store's run has seen, and the SQL that lets it skip rows done and
unchanged (`flow.unchanged`): ids marked seen (a duplicate id names its first row), the
render fingerprint each stage's items were keyed under, a batch of rows marked seen and
matched against the stored items, and the items no row of the run names dropped, each in
one hop to the connection's thread."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from flow.store.sqlite_sql import (
    MAX_VARIABLES,
    insert_seen_sql,
    reassign_payer,
    run_in_transaction,
)

# in `store_info`: the render fingerprint every item of the stage was keyed under
RENDERED_KEY = "rendered:{stage}"


def mark_seen(db: sqlite3.Connection, rows: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Remember (item id, row) pairs as seen by this run; the first row of each id, where
    it has one (an earlier batch's, for an id seen twice). On the connection's thread."""
    first: dict[str, int] = {}
    for item_id, row in rows:
        first.setdefault(item_id, row)
    unique = list(first.items())
    taken: set[str] = set()
    for start in range(0, len(unique), MAX_VARIABLES // 2):
        chunk = unique[start:start + MAX_VARIABLES // 2]
        taken.update(item_id for (item_id,) in db.execute(
            insert_seen_sql(len(chunk)), [v for pair in chunk for v in pair]))
    clashes = [item_id for item_id, _ in unique if item_id not in taken]
    for start in range(0, len(clashes), 900):
        names = clashes[start:start + 900]
        marks = ",".join("?" * len(names))
        for item_id, row in db.execute(
                f"SELECT item_id, row FROM seen_ids WHERE item_id IN ({marks})", names):
            first[item_id] = row
    return first


def forget(db: sqlite3.Connection, where: str, params: list[Any]) -> int:
    """Drop the items and outputs `where` picks, crediting the replies they paid for to
    other items that use them, in one transaction; how many items went. On the
    connection's thread."""
    ((count,),) = db.execute(f"SELECT COUNT(*) FROM items WHERE {where}", params).fetchall()
    if not count:  # an output is saved only for an item saved before it
        return 0
    gone = [reply for (reply,) in db.execute(
        f"SELECT DISTINCT response_id FROM outputs WHERE {where} AND bought", params)]
    step = MAX_VARIABLES // 2
    run_in_transaction(db, [
        (f"DELETE FROM outputs WHERE {where}", params),
        (f"DELETE FROM items WHERE {where}", params),
        *(reassign_payer(gone[start:start + step]) for start in range(0, len(gone), step))])
    return int(count)


def begin_rendering(db: sqlite3.Connection, stage: str, fingerprint: str) -> bool:
    """Whether every item stored at `stage` was keyed under `fingerprint`; if not, that
    claim is dropped before any item is saved, or made at once when the stage has none yet.
    On the connection's thread."""
    key = RENDERED_KEY.format(stage=stage)
    if db.execute("SELECT value FROM store_info WHERE key = ?", (key,)).fetchall() == [
            (fingerprint,)]:
        return True
    if db.execute("SELECT 1 FROM items WHERE stage = ? LIMIT 1", (stage,)).fetchall():
        db.execute("DELETE FROM store_info WHERE key = ?", (key,))
    else:
        end_rendering(db, stage, fingerprint)
    return False


def end_rendering(db: sqlite3.Connection, stage: str, fingerprint: str) -> None:
    """Record that every item stored at `stage` was keyed under `fingerprint`."""
    db.execute("INSERT OR REPLACE INTO store_info VALUES (?, ?)",
               (RENDERED_KEY.format(stage=stage), fingerprint))

BATCH_TABLE = ("CREATE TEMP TABLE IF NOT EXISTS batch_rows "
               "(item_id TEXT NOT NULL, row INTEGER NOT NULL, input TEXT)")
# the stored item reads the same input at the same row, rendered fine, and is done from its
# current request under the post steps ?3, at the origin ?2, at stage ?1
DONE_UNCHANGED = """
    SELECT 1 FROM items JOIN outputs ON outputs.stage = items.stage
        AND outputs.item_id = items.item_id
    WHERE items.stage = ?1 AND items.item_id = batch_rows.item_id
        AND items.row = batch_rows.row AND items.input = batch_rows.input
        AND items.origin = ?2 AND items.request_key IS NOT NULL
        AND items.error_class IS NULL AND items.error IS NULL AND NOT items.skipped
        AND items.stopped_at IS NULL AND outputs.request_key = items.request_key
        AND outputs.origin = ?2 AND outputs.status = 'done' AND outputs.post_key = ?3"""
# rows of the batch that are the first with their id (not a duplicate)
FIRST_WITH_ID = ("JOIN seen_ids ON seen_ids.item_id = batch_rows.item_id "
                 "AND seen_ids.row = batch_rows.row")


def see_unchanged(db: sqlite3.Connection, stage: str, origin: str, post_key: str,
                  rows: Sequence[tuple[str, int, str | None]],
                  with_output: bool) -> tuple[str, str]:
    """Mark a batch of (item id, row, input) seen, and find which rows with an input are the
    first with their id and done and unchanged (`DONE_UNCHANGED`); on the connection's thread.

    Returns, as JSON, the rows seen before this batch with the same ids ([item id, row]), and
    the ids of the rows with an input that are not done and unchanged; `with_output`: an
    object of those that are, each with its output. Each answer is one row: a row handed
    back takes the interpreter's lock on this thread, while the loop reads the next batch.
    """
    db.execute(BATCH_TABLE)
    db.execute("DELETE FROM batch_rows")
    for start in range(0, len(rows), MAX_VARIABLES // 3):
        chunk = rows[start:start + MAX_VARIABLES // 3]
        db.execute("INSERT INTO batch_rows VALUES " + ", ".join(["(?, ?, ?)"] * len(chunk)),
                   [value for row in chunk for value in row])
    ((before,),) = db.execute(
        "SELECT json_group_array(json_array(seen_ids.item_id, seen_ids.row)) FROM batch_rows "
        "JOIN seen_ids ON seen_ids.item_id = batch_rows.item_id").fetchall()
    db.execute("INSERT OR IGNORE INTO seen_ids SELECT item_id, row FROM batch_rows "
               "ORDER BY row")
    params = (stage, origin, post_key)
    if with_output:
        ((answer,),) = db.execute(
            "SELECT json_group_object(batch_rows.item_id, outputs.output) "
            f"FROM batch_rows {FIRST_WITH_ID} JOIN outputs ON outputs.stage = ?1 "
            "AND outputs.item_id = batch_rows.item_id "
            f"WHERE batch_rows.input IS NOT NULL AND EXISTS ({DONE_UNCHANGED})",
            params).fetchall()
    else:
        ((answer,),) = db.execute(
            f"SELECT json_group_array(batch_rows.item_id) FROM batch_rows {FIRST_WITH_ID} "
            f"WHERE batch_rows.input IS NOT NULL AND NOT EXISTS ({DONE_UNCHANGED})",
            params).fetchall()
    return str(before), str(answer)


def read_unchanged(rows: Sequence[tuple[str, int, str | None]], before: str, answer: str,
                   with_output: bool) -> tuple[dict[str, int], dict[str, str | None]]:
    """The first row of each id of the batch, and the ids done and unchanged with their
    outputs (None unless `with_output`), from what `see_unchanged` answered."""
    first: dict[str, int] = {}
    for item_id, row, _ in rows:
        first.setdefault(item_id, row)
    first.update(json.loads(before))
    if with_output:
        return first, json.loads(answer)
    not_done = set(json.loads(answer))
    return first, {item_id: None for item_id, row, text in rows
                   if text is not None and first[item_id] == row and item_id not in not_done}
