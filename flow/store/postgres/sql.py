"""The SQL the PostgreSQL store runs where SQLite's does not fit, built as plain values.

SQL that both engines read alike (the batch book in `shards.py`, a run's reconciling) is
written once with SQLite's `?` and turned into psycopg's `%s` by `pyformat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flow.config.store_url import StoreURL
from flow.errors import StoreError
from flow.store.sqlite_sql import GroupRows

Statement = tuple[str, Sequence[Any]]
STORE_LOCK = 0x666C6F77_0002  # pg_try_advisory_lock key: the one live run ("flow", 2)


def pyformat(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s` (and a literal `%` as `%%`), leaving
    quoted strings and names alone."""
    out: list[str] = []
    quote: str | None = None
    for char in sql:
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "?":
            out.append("%s")
            continue
        if char == "%":
            out.append("%%")
            continue
        out.append(char)
    return "".join(out)


def store_error(url: StoreURL, doing: str, error: Exception) -> StoreError:
    """A `StoreError` naming the store (never its password) and what went wrong."""
    if isinstance(error, StoreError):
        return error
    text = str(error).strip().replace(url.conninfo, str(url)) or type(error).__name__
    return StoreError(f"{url}: {doing}: {text}; everything committed before is safe")


# one statement per table and group, its rows bound as one array per column (`unnest`):
# a statement per row cost more than half the store's throughput. The arrays go in binary
# (`%b`): psycopg quotes each value of a text-format array through a regular expression,
# which cost a fifth of a worker's CPU per result
RESPONSE_COLUMNS = (
    ("id", "bigint"), ("request_key", "text"), ("origin", "text"), ("model", "text"),
    ("request", "text"), ("body", "text"), ("prompt_tokens", "int"),
    ("completion_tokens", "int"), ("cached_tokens", "int"), ("cost_usd", "float8"),
    ("attempts", "int"), ("latency_ms", "float8"), ("started_at", "text"),
    ("finished_at", "text"), ("run_id", "bigint"), ("batch_id", "text"))
ATTEMPT_COLUMNS = (
    ("request_key", "text"), ("origin", "text"), ("run_id", "bigint"), ("number", "int"),
    ("started_at", "text"), ("latency_ms", "float8"), ("status_code", "int"),
    ("outcome", "text"), ("error", "text"), ("wait_s", "float8"))
OUTPUT_COLUMNS = (
    ("stage", "text"), ("item_id", "text"), ("request_key", "text"), ("origin", "text"),
    ("status", "text"), ("output", "text"), ("post_key", "text"), ("error_class", "text"),
    ("error", "text"), ("response_id", "bigint"), ("bought", "int"), ("attempts", "int"),
    ("finished_at", "text"), ("run_id", "bigint"), ("truncated", "int"))
ITEM_COLUMNS = (
    ("stage", "text"), ("item_id", "text"), ("row", "int"), ("input", "text"),
    ("request_key", "text"), ("origin", "text"), ("error_class", "text"), ("error", "text"),
    ("skipped", "int"), ("stopped_at", "text"), ("updated_at", "text"))
VECTOR_COLUMNS = (("response_id", "bigint"), ("dimensions", "int"), ("vector", "bytea"))
Columns = Sequence[tuple[str, str]]


def unnest_insert(table: str, columns: Columns, upsert: bool = False) -> str:
    """INSERT of many rows bound as one binary array per column; `upsert`: a row whose
    (stage, item_id) is there already replaces it."""
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"%b::{kind}[]" for _, kind in columns)
    tail = (" ON CONFLICT (stage, item_id) DO UPDATE SET " + ", ".join(
        f"{name} = EXCLUDED.{name}" for name, _ in columns[2:])) if upsert else ""
    return f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}){tail}"


RESPONSES_INSERT = unnest_insert("responses", RESPONSE_COLUMNS)
ATTEMPTS_INSERT = unnest_insert("attempts", ATTEMPT_COLUMNS)
OUTPUTS_UPSERT = unnest_insert("outputs", OUTPUT_COLUMNS, upsert=True)
ITEMS_UPSERT = unnest_insert("items", ITEM_COLUMNS, upsert=True)
VECTORS_INSERT = unnest_insert("vectors", VECTOR_COLUMNS)
NEXT_IDS = ("SELECT nextval(pg_get_serial_sequence('responses', 'id')) "
            "FROM generate_series(1, %s)")


def columns_of(rows: Sequence[Sequence[Any]], columns: Columns,
               keyed: bool = False) -> tuple[list[Any], ...]:
    """`rows` as one list per column, for `unnest`, each of one Python type as a binary
    array needs (a bool as an int, an int in a float column as a float); `keyed`: the last
    row of each (stage, item_id) only, as an upsert may change a row once per statement."""
    if keyed:
        rows = list({(row[0], row[1]): row for row in rows}.values())
    out: list[list[Any]] = []
    for column, (_, kind) in zip(zip(*rows, strict=True), columns, strict=True):
        if kind == "float8":
            out.append([None if v is None else float(v) for v in column])
        elif kind == "int":
            out.append([int(v) if isinstance(v, bool) else v for v in column])
        else:
            out.append(list(column))
    return tuple(out)


def group_writes(rows: GroupRows) -> list[tuple[str, Sequence[Any]]]:
    """(statement, parameters) to run in order for one group commit."""
    writes: list[tuple[str, Sequence[Any]]] = []
    if rows.responses:
        writes.append((RESPONSES_INSERT, columns_of(rows.responses, RESPONSE_COLUMNS)))
    if rows.vectors:  # after their replies: each names its reply
        writes.append((VECTORS_INSERT, columns_of(rows.vectors, VECTOR_COLUMNS)))
    if rows.attempts:
        writes.append((ATTEMPTS_INSERT, columns_of(rows.attempts, ATTEMPT_COLUMNS)))
    if rows.outputs:
        writes.append((OUTPUTS_UPSERT, columns_of(rows.outputs, OUTPUT_COLUMNS, keyed=True)))
    if rows.reassign:
        writes.append((REASSIGN_PAYER, (rows.reassign,)))
    return writes


# one current output made from each reply carries its cost (`bought`), or none does; the
# first by (stage, item id), as SQLite's store takes the first by rowid
REASSIGN_PAYER = """
    UPDATE outputs SET bought = CASE WHEN (outputs.stage, outputs.item_id) = (
        SELECT current.stage, current.item_id FROM outputs AS current
        JOIN items ON items.stage = current.stage AND items.item_id = current.item_id
            AND items.request_key = current.request_key AND items.origin = current.origin
        WHERE current.response_id = outputs.response_id
        ORDER BY current.stage, current.item_id LIMIT 1) THEN 1 ELSE 0 END
    WHERE response_id = ANY(%s)"""


def known_sql(with_output: bool) -> str:
    """For the (item id, request key) arrays bound as `ids` and `keys`, with `stage` and
    `origin`: each item's output, and its request's latest reply; `with_output`: the
    output's JSON and error last."""
    output = ", outputs.output, outputs.error" if with_output else ""
    return f"""
        WITH wanted (item_id, request_key) AS (
            SELECT * FROM unnest(%(ids)s::text[], %(keys)s::text[]))
        SELECT wanted.item_id, outputs.request_key, outputs.post_key, outputs.status,
            outputs.error_class, outputs.response_id, outputs.bought,
            CASE WHEN outputs.request_key = wanted.request_key
                      AND outputs.status = 'done' THEN outputs.response_id
                 ELSE (SELECT MAX(id) FROM responses
                       WHERE responses.request_key = wanted.request_key
                         AND responses.origin = %(origin)s) END{output}
        FROM wanted LEFT JOIN outputs ON outputs.stage = %(stage)s
            AND outputs.item_id = wanted.item_id AND outputs.origin = %(origin)s"""


KNOWN_ITEMS_SQL = ("SELECT item_id, row, request_key, origin, error_class, error, input, "
                   "skipped, stopped_at FROM items WHERE stage = %s AND item_id = ANY(%s)")
USED_REPLIES_SQL = ("SELECT DISTINCT response_id FROM outputs WHERE stage = %s AND "
                    "item_id = ANY(%s) AND response_id IS NOT NULL")

# what a run has read, in its own session: the ids seen (to refuse duplicates), the rows
# held to be named last
SEEN_TABLES = (
    "CREATE TEMP TABLE IF NOT EXISTS seen_ids (item_id TEXT PRIMARY KEY, row INTEGER NOT NULL)",
    "TRUNCATE seen_ids",
    "CREATE TEMP TABLE IF NOT EXISTS held_rows "
    "(row INTEGER PRIMARY KEY, base TEXT NOT NULL, error_class TEXT, error TEXT)",
    "TRUNCATE held_rows")
INSERT_SEEN_SQL = ("INSERT INTO seen_ids SELECT * FROM unnest(%s::text[], %s::integer[]) "
                   "ON CONFLICT DO NOTHING RETURNING item_id")
SEEN_ROWS_SQL = "SELECT item_id, row FROM seen_ids WHERE item_id = ANY(%s)"
INSERT_HELD_SQL = ("INSERT INTO held_rows VALUES (%s, %s, %s, %s) ON CONFLICT (row) DO UPDATE "
                   "SET base = EXCLUDED.base, error_class = EXCLUDED.error_class, "
                   "error = EXCLUDED.error")
HELD_SQL = ("SELECT row, base, error_class, error FROM held_rows WHERE row > %s ORDER BY row "
            "LIMIT %s")


def unseen(table: str) -> str:
    """Rows of `table` at the stage bound first whose item this run did not read."""
    return (f"{table}.stage = %s AND NOT EXISTS (SELECT 1 FROM seen_ids "
            f"WHERE seen_ids.item_id = {table}.item_id)")


def gone_stages(table: str) -> str:
    """Rows of `table` at stages not in the array bound first."""
    return f"NOT ({table}.stage = ANY(%s))"


CRASHED_SQL = ("UPDATE runs SET state = 'crashed', finished_at = COALESCE(finished_at, %s) "
               "WHERE state = 'running' RETURNING id")
NEW_RUN_SQL = ("INSERT INTO runs (pipeline, origin, endpoint, pid, started_at, state) "
               "VALUES (%s, %s, %s, %s, %s, 'running') RETURNING id")
RUNNING_PID_SQL = "SELECT pid FROM runs WHERE state = 'running' ORDER BY id DESC LIMIT 1"
