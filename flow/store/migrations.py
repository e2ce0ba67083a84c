"""The store's schema, as named, append-only migrations.

Each migration runs once, in its own transaction together with its row in `migrations`.
A migration that has landed is never edited: change the schema by appending a new one.
`docs/store.md` documents the schema these produce (a test compares them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from flow.errors import StoreError
from flow.prices import cost_usd, price_for
from flow.store.batches_schema import m006_batches
from flow.store.sqlite_sql import store_error
from flow.store.stages_schema import m005_stages
from flow.store.vectors_schema import m007_vectors
from flow.store.views import m003_results_output_text_and_browse, m004_truncated_outputs

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


@migration
def m002_split_responses_from_outputs(db: sqlite3.Connection) -> None:
    """Paid replies in an append-only `responses`; what each item made of one in `outputs`.

    `calls` mixed the two and was rewritten in place (a post edit wiped the cost of what
    was paid). Its rows move here: each paid reply once, each item's output once; tokens
    a repost had wiped are read back from the reply's own `usage`, and their cost priced
    again from the price table (a price set in `call.price` was not stored, so a model
    missing from the table keeps no cost).
    """
    db.create_function("flow_cost", 4, _list_cost, deterministic=True)
    db.execute("""
        CREATE TABLE responses (
            id INTEGER PRIMARY KEY,
            request_key TEXT NOT NULL,
            origin TEXT NOT NULL,
            model TEXT NOT NULL,
            request TEXT NOT NULL,
            body TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL,
            attempts INTEGER NOT NULL,
            latency_ms REAL,
            started_at TEXT NOT NULL,
            finished_at TEXT NOT NULL,
            run_id INTEGER REFERENCES runs (id)
        )""")
    db.execute("CREATE INDEX responses_by_request ON responses (request_key, origin, id)")
    db.execute("CREATE INDEX responses_by_run ON responses "
               "(run_id, cost_usd, prompt_tokens, completion_tokens, attempts)")
    for event in ("UPDATE", "DELETE"):
        db.execute(f"""
            CREATE TRIGGER responses_never_{event.lower()} BEFORE {event} ON responses
            BEGIN SELECT RAISE(ABORT, 'responses are paid for: never changed or removed'); END""")
    # INSERT OR REPLACE deletes without firing delete triggers: refuse it before it starts
    db.execute("""
        CREATE TRIGGER responses_never_replaced BEFORE INSERT ON responses
        WHEN EXISTS (SELECT 1 FROM responses WHERE id = NEW.id)
        BEGIN SELECT RAISE(ABORT, 'responses are paid for: never changed or removed'); END""")
    db.execute("""
        CREATE TABLE outputs (
            stage TEXT NOT NULL,
            item_id TEXT NOT NULL,
            request_key TEXT NOT NULL,
            origin TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
            output TEXT,
            post_key TEXT,
            error_class TEXT,
            error TEXT,
            response_id INTEGER REFERENCES responses (id),
            bought INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            finished_at TEXT NOT NULL,
            run_id INTEGER REFERENCES runs (id),
            PRIMARY KEY (stage, item_id)
        )""")
    # covering what planning, `flow status` and the `results` view's counts read, away from
    # the large `output` column
    db.execute("CREATE INDEX outputs_summary ON outputs (stage, item_id, origin, request_key, "
               "post_key, status, error_class, response_id, bought, attempts)")
    db.execute("CREATE INDEX outputs_by_response ON outputs (response_id)")
    db.execute("""
        INSERT INTO responses (request_key, origin, model, request, body, prompt_tokens,
            completion_tokens, cached_tokens, cost_usd, attempts, latency_ms, started_at,
            finished_at, run_id)
        SELECT request_key, origin, model, request, response,
            COALESCE(prompt_tokens, response ->> '$.usage.prompt_tokens', 0),
            COALESCE(completion_tokens, response ->> '$.usage.completion_tokens', 0),
            COALESCE(cached_tokens,
                     response ->> '$.usage.prompt_tokens_details.cached_tokens', 0),
            CASE WHEN prompt_tokens IS NULL AND json_type(response, '$.usage') = 'object'
                THEN flow_cost(model, response ->> '$.usage.prompt_tokens',
                               response ->> '$.usage.completion_tokens',
                               response ->> '$.usage.prompt_tokens_details.cached_tokens')
                ELSE cost_usd END,
            attempts, latency_ms, started_at, finished_at, run_id
        FROM calls WHERE response IS NOT NULL AND json_valid(response) ORDER BY rowid""")
    db.execute("""
        INSERT INTO outputs (stage, item_id, request_key, origin, status, output, post_key,
            error_class, error, response_id, bought, attempts, finished_at, run_id)
        SELECT items.stage, items.item_id, calls.request_key, calls.origin, calls.status,
            calls.output, calls.post_key, calls.error_class, calls.error, responses.id,
            items.row = (SELECT MIN(other.row) FROM items AS other
                         WHERE other.request_key = items.request_key
                           AND other.origin = items.origin AND other.error_class IS NULL),
            calls.attempts, calls.finished_at, calls.run_id
        FROM items
        JOIN calls ON calls.request_key = items.request_key AND calls.origin = items.origin
        LEFT JOIN responses ON responses.request_key = calls.request_key
            AND responses.origin = calls.origin
        WHERE items.error_class IS NULL""")
    db.execute("DROP VIEW results")
    db.execute("DROP TABLE calls")
    _reconcile_runs(db)
    db.execute("""
        CREATE VIEW results AS
        SELECT
            items.stage,
            items.item_id,
            items.row,
            CASE
                WHEN items.error_class IS NOT NULL THEN 'failed'
                WHEN outputs.status IS NULL THEN 'pending'
                ELSE outputs.status
            END AS status,
            outputs.output,
            COALESCE(items.error_class, outputs.error_class) AS error_class,
            COALESCE(items.error, outputs.error) AS error,
            CASE WHEN outputs.bought THEN responses.prompt_tokens ELSE 0 END AS prompt_tokens,
            CASE WHEN outputs.bought THEN responses.completion_tokens ELSE 0 END
                AS completion_tokens,
            CASE WHEN outputs.bought THEN responses.cost_usd ELSE 0 END AS cost_usd,
            responses.model,
            outputs.attempts,
            CASE WHEN outputs.bought THEN responses.latency_ms END AS latency_ms,
            outputs.finished_at,
            items.origin,
            outputs.response_id
        FROM items
        LEFT JOIN outputs
            ON outputs.stage = items.stage AND outputs.item_id = items.item_id
            AND outputs.request_key = items.request_key AND outputs.origin = items.origin
        LEFT JOIN responses ON responses.id = outputs.response_id""")


# the views people read, beside the code that makes `browse` again for each store
migration(m003_results_output_text_and_browse)
migration(m004_truncated_outputs)
migration(m005_stages)
migration(m006_batches)
migration(m007_vectors)


def _list_cost(model: str, prompt: object, completion: object, cached: object) -> float | None:
    """Dollars for a reply's usage at the price table's list price for its model."""
    counts = [value if isinstance(value, int) and value >= 0 else 0
              for value in (prompt, completion, cached)]
    return cost_usd(price_for(model, None), *counts)


def _reconcile_runs(db: sqlite3.Connection) -> None:
    """Each run's tokens and cost, from the replies it paid for (the one source of truth)."""
    db.execute("""
        UPDATE runs SET
            prompt_tokens = COALESCE(paid.prompt_tokens, 0),
            completion_tokens = COALESCE(paid.completion_tokens, 0),
            cost_usd = COALESCE(paid.cost_usd, 0)
        FROM (SELECT runs.id AS run_id, SUM(responses.prompt_tokens) AS prompt_tokens,
                     SUM(responses.completion_tokens) AS completion_tokens,
                     SUM(responses.cost_usd) AS cost_usd
              FROM runs LEFT JOIN responses ON responses.run_id = runs.id
              GROUP BY runs.id) AS paid
        WHERE paid.run_id = runs.id""")


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


def prepare_store(path: Path, busy_timeout_s: float = 5.0) -> None:
    """Create the store if needed and bring its schema up to date."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s)
    except sqlite3.Error as e:
        raise store_error(path, "cannot open the store", e, busy_timeout_s) from None
    try:
        db.execute("PRAGMA journal_mode=WAL")
        apply_migrations(db)
        newer = unknown_migrations(db)
        if newer:
            raise StoreError(f"{path}: written by a newer flow (migrations {', '.join(newer)}); "
                             "upgrade flow to use it")
    except sqlite3.DatabaseError as e:
        raise store_error(path, "cannot prepare the store", e, busy_timeout_s) from None
    finally:
        db.close()
