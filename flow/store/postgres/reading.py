"""The read commands' connection to a PostgreSQL store: SQLite's DB-API shape over psycopg.

`report.py` and `export.py` write their SQL once, with `?` placeholders and portable SQL;
`Reader.execute` turns the placeholders into psycopg's and returns the cursor, so
`db.execute(sql, params).fetchall()` reads alike on either store. Every read runs in one
read-only transaction, through server-side cursors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flow.config.store_url import StoreURL
from flow.errors import StoreError
from flow.store.postgres import require_psycopg
from flow.store.postgres.connect import CONNECT_TIMEOUT_S
from flow.store.postgres.schema import READS_NEED
from flow.store.postgres.sql import pyformat, store_error

FETCH_ROWS = 10_000  # rows a server-side cursor brings per round trip when iterated


class Reader:
    """A read-only psycopg connection that takes SQLite-style statements."""

    def __init__(self, url: StoreURL) -> None:
        require_psycopg()
        import psycopg

        self.url = url
        self._cursors = 0
        try:
            self._db = psycopg.connect(url.conninfo, connect_timeout=CONNECT_TIMEOUT_S,
                                       application_name="flow")
            self._db.read_only = True
            # a read command reads every row of its cursors: planned for a tenth of them (the
            # default), an export joined items to outputs row by row, quadratic in the items
            # when the statistics were older than the workers' writes (60 s for 20,000)
            self._db.execute("SET cursor_tuple_fraction = 1")
            self.execute("SELECT 1 FROM outputs LIMIT 1")
            (migrated,) = self.execute("SELECT COUNT(*) FROM migrations WHERE name = ?",
                                       (READS_NEED,)).fetchone()
        except psycopg.Error as e:
            raise store_error(url, "cannot read the store (plan or run the pipeline once to "
                                   "create it)", e) from None
        if not migrated:
            self.close()
            raise StoreError(f"{url}: the store was made by an older flow; `flow plan` (or a "
                             "worker) with this one brings it up to date, then read it")

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        """The cursor of `sql`, run with `params`: a server-side cursor, so an export of a
        million rows comes in the batches `fetchmany` asks for, never whole into memory."""
        import psycopg

        self._cursors += 1
        cursor = self._db.cursor(name=f"flow_read_{self._cursors}")
        cursor.itersize = FETCH_ROWS
        try:
            return cursor.execute(pyformat(sql), list(params))
        except psycopg.Error as e:
            raise store_error(self.url, "cannot read the store", e) from None

    def close(self) -> None:
        """Disconnect."""
        self._db.close()
