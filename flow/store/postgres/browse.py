"""The `browse` view of a PostgreSQL store: the last stage's results for reading, made again
after each run with a column per input field (the same fields SQLite's view shows).
"""

from __future__ import annotations

from collections.abc import Sequence

from flow.records import STAGE
from flow.store.quoting import sql_name, sql_text
from flow.store.views import browse_view


def browse_sql(fields: Sequence[tuple[str, str]], stages: Sequence[str] = (STAGE,)) -> str:
    """`CREATE VIEW browse`: the last stage's results for reading, each (field, column) of
    the input after `item_id`, each earlier stage's output beside them (`<stage>_output`)."""
    extra = "".join(f"\n    items.input::jsonb ->> {sql_text(field)} AS {sql_name(column)},"
                    for field, column in fields)
    earlier = "".join(f"""
    (SELECT COALESCE(e.output_text, e.output) FROM results AS e
     WHERE e.stage = {sql_text(name)} AND e.item_id = results.item_id AND e.status = 'done')
        AS {sql_name(name + '_output')},""" for name in stages[:-1])
    return browse_view(extra + earlier, "ROUND(results.cost_usd::numeric, 6)::double precision",
                       stages)
