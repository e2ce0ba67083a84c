"""The schema of the Batch API executor: each shard of calls and its place in the state
machine, readable with SQL (`select * from batches`).

Landed migrations are never edited.
"""

from __future__ import annotations

import sqlite3
import uuid

SHARD_STATES = ("planned", "uploaded", "creating", "submitted", "terminal", "collected")


def m006_batches(db: sqlite3.Connection) -> None:
    """`batches`: one row per shard sent through the Batch API, with its state; `batch_lines`:
    the requests each shard holds; `responses.batch_id`: the batch a reply came through;
    `store_info`: the store's own id, which names it in each batch's metadata (a store that
    is moved or copied keeps finding its batches)."""
    states = ", ".join(f"'{state}'" for state in SHARD_STATES)
    db.execute(f"""
        CREATE TABLE batches (
            id INTEGER PRIMARY KEY,
            stage TEXT NOT NULL,
            origin TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({states})),
            lines INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            worst_cost_usd REAL,
            file_id TEXT,
            batch_id TEXT,
            status TEXT,
            completed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            output_file_id TEXT,
            error_file_id TEXT,
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            run_id INTEGER REFERENCES runs (id)
        )""")
    db.execute("CREATE INDEX batches_open ON batches (stage, origin, state)")
    db.execute("""
        CREATE TABLE batch_lines (
            batch INTEGER NOT NULL REFERENCES batches (id),
            request_key TEXT NOT NULL,
            request TEXT,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'done', 'failed', 'requeued')),
            PRIMARY KEY (batch, request_key)
        ) WITHOUT ROWID""")
    db.execute("CREATE INDEX batch_lines_by_request ON batch_lines (request_key, state)")
    db.execute("CREATE TABLE store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO store_info VALUES ('id', ?)", (uuid.uuid4().hex[:16],))
    db.execute("ALTER TABLE responses ADD COLUMN batch_id TEXT")
    db.execute("CREATE INDEX responses_by_batch ON responses (batch_id) "
               "WHERE batch_id IS NOT NULL")
