"""The `browse` view of a PostgreSQL store: the last stage's results for reading, made again
after each run with a column per input field (the same fields SQLite's view shows).
"""

from __future__ import annotations

from collections.abc import Sequence

from flow.records import STAGE


def browse_sql(fields: Sequence[tuple[str, str]], stages: Sequence[str] = (STAGE,)) -> str:
    """`CREATE VIEW browse`: the last stage's results for reading, each (field, column) of
    the input after `item_id`, each earlier stage's output beside them (`<stage>_output`)."""
    extra = "".join(f"\n    items.input::jsonb ->> {_text(field)} AS {_name(column)},"
                    for field, column in fields)
    earlier = "".join(f"""
    (SELECT COALESCE(e.output_text, e.output) FROM results AS e
     WHERE e.stage = {_text(name)} AND e.item_id = results.item_id AND e.status = 'done')
        AS {_name(name + '_output')},""" for name in stages[:-1])
    return f"""CREATE VIEW browse AS
SELECT
    results.row,
    results.item_id,{extra}{earlier}
    COALESCE(results.output_text, results.output) AS output,
    results.status,
    results.truncated,
    results.error_class,
    results.error,
    ROUND(results.cost_usd::numeric, 6)::double precision AS cost_usd,
    results.prompt_tokens,
    results.completion_tokens,
    results.model,
    results.finished_at,
    items.input
FROM results
JOIN items ON items.stage = {_text(stages[0])} AND items.item_id = results.item_id
WHERE results.stage = {_text(stages[-1])}
ORDER BY results.row"""


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _name(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'
