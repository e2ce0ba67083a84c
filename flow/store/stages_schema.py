"""The schema of a chain of stages: an item's row at a stage says whether `when:` skipped
it there (`skipped`) or an earlier stage stopped it (`stopped_at`).

Landed migrations are never edited; `views.browse_view_sql` makes `browse` for a chain.
"""

from __future__ import annotations

import sqlite3

RESULTS_V5 = """
        CREATE VIEW results AS
        SELECT
            items.stage,
            items.item_id,
            items.row,
            CASE
                WHEN items.skipped THEN 'skipped'
                WHEN items.error_class IS NOT NULL THEN 'failed'
                WHEN outputs.status IS NULL THEN 'pending'
                ELSE outputs.status
            END AS status,
            outputs.output,
            CASE WHEN json_type(outputs.output) = 'text' THEN outputs.output ->> '$' END
                AS output_text,
            COALESCE(outputs.truncated, 0) AS truncated,
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
            outputs.response_id,
            items.stopped_at
        FROM items
        LEFT JOIN outputs
            ON outputs.stage = items.stage AND outputs.item_id = items.item_id
            AND outputs.request_key = items.request_key AND outputs.origin = items.origin
        LEFT JOIN responses ON responses.id = outputs.response_id"""


def m005_stages(db: sqlite3.Connection) -> None:
    """Items gain `skipped` (`when:` was false at this stage) and `stopped_at` (the earlier
    stage whose failure stopped the item); `results` gains the status `skipped` and the
    column `stopped_at`; the covering index of items in input order covers both."""
    db.execute("ALTER TABLE items ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE items ADD COLUMN stopped_at TEXT")
    db.execute("DROP INDEX items_by_row")
    db.execute("CREATE INDEX items_by_row ON items (stage, row, item_id, request_key, origin, "
               "error_class, error, skipped, stopped_at)")
    db.execute("DROP VIEW browse")
    db.execute("DROP VIEW results")
    db.execute(RESULTS_V5)
    db.execute("""
        CREATE VIEW browse AS
        SELECT
            results.row,
            results.item_id,
            COALESCE(results.output_text, results.output) AS output,
            results.status,
            results.truncated,
            results.error_class,
            results.error,
            ROUND(results.cost_usd, 6) AS cost_usd,
            results.prompt_tokens,
            results.completion_tokens,
            results.model,
            results.finished_at,
            items.input
        FROM results
        JOIN items ON items.stage = results.stage AND items.item_id = results.item_id
        WHERE results.stage = 'call'
        ORDER BY results.row""")
