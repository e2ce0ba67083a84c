"""Stored embeddings read back: the `vectors` table, for `flow show` and `flow export`.

A vector is kept as little-endian float32 bytes beside its reply (`store/vectors_schema.py`);
`flow show` gives its dimensions and first numbers, never all 1,536 of them.
"""

from __future__ import annotations

from typing import Any

from flow.endpoints.embeddings import floats

SHOWN = 8  # numbers of a vector `flow show` prints


def vector_summary(db: Any, response_id: int) -> dict[str, Any] | None:
    """A stored vector's dimensions and first numbers, or None when there is none."""
    found = db.execute("SELECT dimensions, substr(vector, 1, ?) FROM vectors "
                       "WHERE response_id = ?", (4 * SHOWN, response_id)).fetchone()
    if found is None:
        return None
    dimensions, head = found
    return {"dimensions": dimensions,
            f"first_{SHOWN}": [round(value, 6) for value in floats(bytes(head))]}
