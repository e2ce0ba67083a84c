"""Opening a store only to look at it, even where nothing may be written.

SQLite reads a WAL store read-only (`mode=ro`) through its `-shm` file, which it creates
when it is missing; on a read-only mount, or in a folder this user may not write, it cannot,
and the open fails. There, a store closed cleanly (no `-wal`, or an empty one) holds every
commit in its main file and is read `immutable` (no locks, no `-shm`); nobody is writing it,
since a writer keeps a `-shm` beside it. A run that was killed leaves its `-wal` and `-shm`,
and `mode=ro` reads both. A `-wal` with commits but no `-shm` (copied without it) cannot be
read from there, and reading the main file alone would show an older store: an error says so.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from flow.errors import StoreError


def read_only_uri(path: Path) -> str:
    """The URI that opens the store at `path` read-only, seeing every commit.

    Raises `StoreError` when commits in its `-wal` cannot be read from where it is.
    """
    uri = f"{path.absolute().as_uri()}?mode=ro"
    if _can_open(uri) or not path.is_file() or os.access(path.parent, os.W_OK):
        return uri  # an open that fails here fails for its caller too, which says why
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"{path}: {wal.name} holds commits not yet in {path.name} (its last run was "
            f"stopped before it closed the store), and SQLite can read them only where it "
            f"may create {path.name}-shm, which {path.parent} does not allow; make the "
            f"folder writable, or copy {path.name} and {wal.name} together to a writable "
            "folder, then run the command again")
    return f"{uri}&immutable=1"


def _can_open(uri: str) -> bool:
    """Whether SQLite can open and read the store at `uri` (it opens files only on a read)."""
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        return False
    return True
