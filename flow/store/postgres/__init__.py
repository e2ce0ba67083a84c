"""The PostgreSQL store: the `Store` protocol on a server many machines can reach.

The same tables, columns and views as the SQLite store (`docs/store.md`, "On PostgreSQL"),
built by its own named, append-only migrations (`schema.py`); the same group commits
(`flow.store.writer.GroupWriter`), with reply ids from a sequence (`store.py`); the SQL that
differs from SQLite's in `sql.py`; the read commands' connection in `reading.py`.

psycopg is an optional extra: nothing here imports it until a PostgreSQL store is opened.
"""

from __future__ import annotations

from flow.errors import MissingExtraError

EXTRA_HINT = "pip install 'flow[postgres]'"


def require_psycopg() -> None:
    """A `MissingExtraError` naming the extra when psycopg is not installed."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"a PostgreSQL store (store: postgresql://...) needs psycopg, an optional extra: "
            f"{EXTRA_HINT}") from None
