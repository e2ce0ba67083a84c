"""Running out of file descriptors: told apart from other failures and named, wherever it is.

A run holds about `call.concurrency` connections, the store's files (database, -wal, -shm,
lock, SQLite's temporary files) and the input file. Past the process's limit (`ulimit -n`)
an open fails with EMFILE (ENFILE: the system's limit) wherever it happens, and each library
says so in its own words: SQLite only "unable to open database file", aiohttp "Cannot connect
to host". The input, the store, the lock and the connections each raise their own error with
`out_of_files_hint()`, so the cause and what to do are always the same words (exit 2).
"""

from __future__ import annotations

import errno
import os
import resource
import sqlite3

OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)
SQLITE_CANTOPEN = 14
NEAR_LIMIT = 0.95  # of the limit in use: a failed open there is taken to be the limit's


def is_out_of_files(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is an open that
    failed for want of file descriptors."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in OUT_OF_FILES:
            return True
        if (isinstance(error, sqlite3.Error)
                and getattr(error, "sqlite_errorcode", None) == SQLITE_CANTOPEN):
            return is_near_limit()  # SQLite keeps the system's reason to itself
        error = error.__cause__ or error.__context__
    return False


def is_near_limit() -> bool:
    """Whether this process has (nearly) as many files open as it may, now."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
        in_use = len(os.listdir("/dev/fd"))
    except OSError as e:
        return e.errno in OUT_OF_FILES
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft != resource.RLIM_INFINITY and in_use >= soft * NEAR_LIMIT


def out_of_files_hint() -> str:
    """What happened and what to do, in the words every such error uses."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = "" if soft == resource.RLIM_INFINITY else f" (this process may open {soft:,})"
    return (f"too many open files{limit}: raise the limit (`ulimit -n`) or lower "
            "call.concurrency")
