"""The schema of embeddings: each paid vector as float32 bytes, beside its reply.

A vector of 1,536 floats is 6,144 bytes here (as JSON text it would be about 20,000), so a
million of them fit in a few GB. Read one with `flow show`, or all with `flow export`; in
SQL, `length(vector) / 4` is its dimension. Landed migrations are never edited.
"""

from __future__ import annotations

import sqlite3


def m007_vectors(db: sqlite3.Connection) -> None:
    """`vectors`: one row per embedding reply (an item's share of a packed request), its
    dimensions and its little-endian float32 bytes; paid for, so never changed."""
    db.execute("""
        CREATE TABLE vectors (
            response_id INTEGER PRIMARY KEY REFERENCES responses (id),
            dimensions INTEGER NOT NULL,
            vector BLOB NOT NULL
        )""")
    for event in ("UPDATE", "DELETE"):
        db.execute(f"""
            CREATE TRIGGER vectors_never_{event.lower()} BEFORE {event} ON vectors
            BEGIN SELECT RAISE(ABORT, 'vectors are paid for: never changed or removed'); END""")
