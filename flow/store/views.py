"""The views people read: `results` with a plain-text output, and `browse`, one row per item.

`results` keeps outputs as JSON text, so a string output reads `"positive"` with its quotes
and `where output = 'positive'` finds nothing; `output_text` beside it is the string itself.

`browse` is for reading (Datasette, `sqlite3`): one row per input row, in input order, each
top-level field of the input in a column of its own, the output as plain text when it is a
string, the cost rounded to a millionth of a dollar. A view cannot grow columns from the
data, so the store makes `browse` again at the end of each run from the fields of its first
`SAMPLE_ROWS` rows: a person can then filter, sort and facet on `question` itself instead of
writing `json_extract(input, '$.question')`. Every field, including those not sampled, stays
in the last column, `input`, as JSON. Before a first run `browse` has no field columns.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence

from flow.records import STAGE
from flow.store.quoting import sql_name, sql_text
from flow.store.sqlite_sql import run_in_transaction

SAMPLE_ROWS = 1000  # rows read for their fields when `browse` is made again
MAX_FIELDS = 50  # field columns at most; wider inputs keep the rest in `input`
FIELD_PREFIX = "input_"  # for a field whose name a column of `browse` already has
OUTPUT_SUFFIX = "_output"  # an earlier stage's output in `browse`: `answer_output`
BROWSE_COLUMNS = ("row", "item_id", "output", "status", "truncated", "error_class", "error",
                  "cost_usd", "prompt_tokens", "completion_tokens", "model", "finished_at",
                  "input")


def m003_results_output_text_and_browse(db: sqlite3.Connection) -> None:
    """`results` gains `output_text`; `browse` shows the results for reading.

    Landed: never edit this SQL. `browse_view_sql` makes the same view with field columns.
    """
    db.execute("DROP VIEW results")
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
            CASE WHEN json_type(outputs.output) = 'text' THEN outputs.output ->> '$' END
                AS output_text,
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
    db.execute("""
        CREATE VIEW browse AS
        SELECT
            results.row,
            results.item_id,
            COALESCE(results.output_text, results.output) AS output,
            results.status,
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


def m004_truncated_outputs(db: sqlite3.Connection) -> None:
    """A reply cut short at `max_tokens` is kept as done and flagged: `outputs.truncated`,
    shown in `results` and `browse`.

    Landed: never edit this SQL. `browse_view_sql` makes the same view with field columns.
    """
    db.execute("ALTER TABLE outputs ADD COLUMN truncated INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX outputs_truncated ON outputs (stage) WHERE truncated")
    db.execute("DROP VIEW browse")
    db.execute("DROP VIEW results")
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
            outputs.response_id
        FROM items
        LEFT JOIN outputs
            ON outputs.stage = items.stage AND outputs.item_id = items.item_id
            AND outputs.request_key = items.request_key AND outputs.origin = items.origin
        LEFT JOIN responses ON responses.id = outputs.response_id""")
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


def browse_view_sql(fields: Sequence[str], stages: Sequence[str] = (STAGE,)) -> str:
    """`CREATE VIEW browse` with a column for each of the input's `fields` after `item_id`:
    the last stage's results, each earlier stage's output beside them (`<stage>_output`)."""
    extra = "".join(f"\n    items.input ->> {sql_text(_path(field))} AS {sql_name(column)},"
                    for field, column in field_columns(fields, stages[:-1]))
    # each earlier stage's current output, looked up by key per row (a join of the `results`
    # view would have SQLite build the whole view first)
    earlier = "".join(f"""
    (SELECT CASE WHEN json_type(o.output) = 'text' THEN o.output ->> '$' ELSE o.output END
     FROM outputs AS o JOIN items AS i ON i.stage = o.stage AND i.item_id = o.item_id
         AND i.request_key = o.request_key AND i.origin = o.origin
     WHERE o.stage = {sql_text(name)} AND o.item_id = results.item_id) AS {sql_name(name + OUTPUT_SUFFIX)},"""
                      for name in stages[:-1])
    return browse_view(extra + earlier, "ROUND(results.cost_usd, 6)", stages)


def browse_view(columns: str, cost: str, stages: Sequence[str]) -> str:
    """`CREATE VIEW browse` over the last of `stages`' results, in input order: `columns`
    (the input's fields, the earlier stages' outputs) after `item_id`, then the results'
    own; `cost` is the cost rounded in the store's own SQL."""
    return f"""CREATE VIEW browse AS
SELECT
    results.row,
    results.item_id,{columns}
    COALESCE(results.output_text, results.output) AS output,
    results.status,
    results.truncated,
    results.error_class,
    results.error,
    {cost} AS cost_usd,
    results.prompt_tokens,
    results.completion_tokens,
    results.model,
    results.finished_at,
    items.input
FROM results
JOIN items ON items.stage = {sql_text(stages[0])} AND items.item_id = results.item_id
WHERE results.stage = {sql_text(stages[-1])}
ORDER BY results.row"""


def field_columns(fields: Sequence[str], earlier: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(field, column name) for the fields `browse` shows in columns of their own.

    A field named like a column of `browse` (an earlier stage's `<stage>_output` among them)
    is shown as `input_<name>`; one that a JSON path cannot name (a `"` in it, or empty), or
    clashes even so, is left in `input`. SQLite's names are case-insensitive, and so are
    these clashes.
    """
    taken = {column.lower() for column in (*BROWSE_COLUMNS,
                                           *(name + OUTPUT_SUFFIX for name in earlier))}
    columns = []
    for field in fields:
        if not field or '"' in field or any(ord(char) < 32 for char in field):
            continue
        column = field if field.lower() not in taken else FIELD_PREFIX + field
        if column.lower() in taken:
            continue
        taken.add(column.lower())
        columns.append((field, column))
        if len(columns) == MAX_FIELDS:
            break
    return columns


def input_fields(db: sqlite3.Connection, stage: str = STAGE) -> list[str]:
    """The top-level fields of the first `SAMPLE_ROWS` inputs, in the order they first come
    (`fields_of`)."""
    return fields_of(db.execute(SAMPLE_INPUTS_SQL, (stage, SAMPLE_ROWS)))


SAMPLE_INPUTS_SQL = ("SELECT item_id, input FROM items WHERE stage = ? AND input IS NOT NULL "
                     "ORDER BY row LIMIT ?")


def fields_of(rows: Iterable[tuple[str, str]]) -> list[str]:
    """The top-level fields of (item id, input JSON) rows, in the order they first come.

    The id field (`load.id`) is left out: in every row it is the item's id, which `browse`
    shows already as `item_id`.
    """
    fields: dict[str, bool] = {}  # field: whether it has been the item's id in every row
    for item_id, text in rows:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            for field, field_value in value.items():
                is_id = str(field_value) == item_id
                fields[field] = fields.get(field, True) and is_id
    return [field for field, is_id in fields.items() if not is_id]


def refresh_browse_view(db: sqlite3.Connection, stages: Sequence[str] = (STAGE,)) -> bool:
    """Make `browse` again with the store's input fields; False when it already has them.

    Runs on the connection's own thread, in one transaction: a reader sees the old view or
    the new one, never none.
    """
    sql = browse_view_sql(input_fields(db, stages[0]), stages)
    current = db.execute("SELECT sql FROM sqlite_master WHERE type = 'view' "
                         "AND name = 'browse'").fetchone()
    if current is not None and current[0] == sql:
        return False
    run_in_transaction(db, [("DROP VIEW IF EXISTS browse", []), (sql, [])])
    return True


def _path(field: str) -> str:
    return '$."' + field + '"'
