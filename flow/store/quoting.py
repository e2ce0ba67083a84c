"""Values and names written into SQL text, where a parameter cannot go (a view's body, a
JSON path): quoted the way SQLite and PostgreSQL both read them."""

from __future__ import annotations


def sql_text(value: str) -> str:
    """`value` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_name(name: str) -> str:
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
