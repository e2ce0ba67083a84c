"""Stored embeddings read back: the `vectors` table, for `flow show` and `flow export`.

A vector is kept as little-endian float32 bytes beside its reply (`store/vectors_schema.py`);
`flow show` gives its dimensions and first numbers, never all 1,536 of them. JSONL and CSV
exports carry each vector as a list of floats in an `embedding` key or column (Parquet
copies the bytes as they are, `export_parquet.vector_array`).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from flow.endpoints.embeddings import floats

SHOWN = 8  # numbers of a vector `flow show` prints
EMBEDDING = "embedding"  # the key or column that holds an item's vector in an export
# the stored vector of a row of the `results` view
VECTOR_OF_RESULT = ("(SELECT vector FROM vectors WHERE vectors.response_id = "
                    "results.response_id)")
# whether the store has `vectors` (a store from before embeddings has not): a failed read
# would end a PostgreSQL reader's transaction, so it is looked up, not tried
HAS_VECTORS_SQLITE = ("SELECT COUNT(*) FROM sqlite_master "
                      "WHERE type = 'table' AND name = 'vectors'")
HAS_VECTORS_POSTGRES = ("SELECT COUNT(*) FROM information_schema.tables "
                        "WHERE table_name = 'vectors' AND table_schema = current_schema()")


def vector_summary(db: Any, response_id: int) -> dict[str, Any] | None:
    """A stored vector's dimensions and first numbers, or None when there is none."""
    found = db.execute("SELECT dimensions, substr(vector, 1, ?) FROM vectors "
                       "WHERE response_id = ?", (4 * SHOWN, response_id)).fetchone()
    if found is None:
        return None
    dimensions, head = found
    return {"dimensions": dimensions,
            f"first_{SHOWN}": [round(value, 6) for value in floats(bytes(head))]}


def vector_dimensions(db: Any, stage: str) -> list[int]:
    """The sizes of the vectors a stage's outputs were made from (none: not embeddings)."""
    has = HAS_VECTORS_SQLITE if isinstance(db, sqlite3.Connection) else HAS_VECTORS_POSTGRES
    if not db.execute(has).fetchone()[0]:  # a store from before embeddings
        return []
    found = db.execute("SELECT DISTINCT vectors.dimensions FROM outputs JOIN vectors "
                       "ON vectors.response_id = outputs.response_id "
                       "WHERE outputs.stage = ? ORDER BY 1", (stage,)).fetchall()
    return [dimensions for (dimensions,) in found]


def vector_json(vector: bytes | None) -> str:
    """A vector as a JSON list of floats, each as few digits as give it back exactly."""
    if vector is None:
        return "null"
    return "[" + ",".join([f"{value:.9g}" for value in floats(vector)]) + "]"


class VectorRows:
    """An export's rows, each with its vector last, with the vector put in: spliced into the
    JSONL record as `"embedding": [...]`, or a CSV column of JSON."""

    def __init__(self, rows: Any, fmt: str) -> None:
        self._rows = rows
        self._jsonl = fmt == "jsonl"

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        """The next rows, as the export writes them."""
        batch = self._rows.fetchmany(size)
        if self._jsonl:
            return [(*row[:-2], f'{row[-2][:-1]},"{EMBEDDING}":{vector_json(row[-1])}}}')
                    for row in batch]
        return [(*row[:-1], None if row[-1] is None else vector_json(row[-1]))
                for row in batch]
