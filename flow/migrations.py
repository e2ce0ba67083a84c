"""The store's schema, as named, append-only migrations.

Each migration runs once, in its own transaction together with its row in `migrations`.
A migration that has landed is never edited: change the schema by appending a new one.
`docs/store.md` documents the schema these produce (a test compares them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(function: Migration) -> Migration:
    """Register `function` as the next migration, named after it."""
    MIGRATIONS.append((function.__name__, function))
    return function


@migration
def m001_create_runs_items_calls(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            pipeline TEXT NOT NULL,
            origin TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            state TEXT NOT NULL,
            items_total INTEGER,
            items_done INTEGER NOT NULL DEFAULT 0,
            items_failed INTEGER NOT NULL DEFAULT 0,
            items_skipped INTEGER NOT NULL DEFAULT 0,
            calls_made INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            commit_groups INTEGER NOT NULL DEFAULT 0,
            commit_wait_mean_ms REAL,
            commit_wait_max_ms REAL,
            message TEXT
        )""")
    db.execute("""
        CREATE TABLE items (
            stage TEXT NOT NULL,
            item_id TEXT NOT NULL,
            row INTEGER NOT NULL,
            input TEXT,
            request_key TEXT,
            origin TEXT NOT NULL,
            error_class TEXT,
            error TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (stage, item_id)
        ) WITHOUT ROWID""")
    # covering, so an export in input order reads no item rows (a million random lookups)
    db.execute("CREATE INDEX items_by_row ON items "
               "(stage, row, item_id, request_key, origin, error_class, error)")
    db.execute("CREATE INDEX items_by_request ON items (request_key, origin)")
    db.execute("CREATE INDEX items_with_errors ON items (stage, row) "
               "WHERE error_class IS NOT NULL")
    db.execute("""
        CREATE TABLE calls (
            request_key TEXT NOT NULL,
            origin TEXT NOT NULL,
            model TEXT NOT NULL,
            request TEXT NOT NULL,
            response TEXT,
            output TEXT,
            post_key TEXT,
            status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
            error_class TEXT,
            error TEXT,
            attempts INTEGER NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cached_tokens INTEGER,
            cost_usd REAL,
            latency_ms REAL,
            started_at TEXT NOT NULL,
            finished_at TEXT NOT NULL,
            run_id INTEGER REFERENCES runs (id),
            PRIMARY KEY (request_key, origin)
        )""")
    db.execute("CREATE INDEX calls_by_status ON calls (status, error_class)")
    # covering what `status` and the `results` view need, away from the large text columns
    db.execute("CREATE INDEX calls_summary ON calls (request_key, origin, status, error_class, "
               "prompt_tokens, completion_tokens, cost_usd, attempts)")
    db.execute("""
        CREATE TABLE attempts (
            request_key TEXT NOT NULL,
            origin TEXT NOT NULL,
            run_id INTEGER REFERENCES runs (id),
            number INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            latency_ms REAL NOT NULL,
            status_code INTEGER,
            outcome TEXT NOT NULL,
            error TEXT,
            wait_s REAL
        )""")
    db.execute("CREATE INDEX attempts_by_call ON attempts (request_key, origin)")
    db.execute("""
        CREATE VIEW results AS
        SELECT
            items.stage,
            items.item_id,
            items.row,
            CASE
                WHEN items.error_class IS NOT NULL THEN 'failed'
                WHEN calls.status IS NULL THEN 'pending'
                ELSE calls.status
            END AS status,
            calls.output,
            COALESCE(items.error_class, calls.error_class) AS error_class,
            COALESCE(items.error, calls.error) AS error,
            calls.prompt_tokens,
            calls.completion_tokens,
            calls.cost_usd,
            calls.model,
            calls.attempts,
            calls.latency_ms,
            calls.finished_at,
            items.origin
        FROM items
        LEFT JOIN calls
            ON calls.request_key = items.request_key AND calls.origin = items.origin""")


def apply_migrations(db: sqlite3.Connection) -> list[str]:
    """Apply every migration not yet recorded in `migrations`; return the names applied."""
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    done = {name for (name,) in db.execute("SELECT name FROM migrations")}
    applied = []
    for name, function in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            function(db)
            db.execute("INSERT INTO migrations VALUES (?, datetime('now'))", (name,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


def unknown_migrations(db: sqlite3.Connection) -> list[str]:
    """Migrations recorded in the store that this version of flow does not know."""
    known = {name for name, _ in MIGRATIONS}
    return [name for (name,) in db.execute("SELECT name FROM migrations") if name not in known]
