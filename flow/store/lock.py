"""One live run per store: an advisory lock on the database file itself, released by the
kernel however the process dies.

The lock is an `flock` on the resolved database file, so every path that reaches the store
(a symlink, a relative or absolute path, a hard link) meets the same lock, and no file beside
the store can be deleted or swapped to let a second run in. SQLite locks the same file with
POSIX `fcntl` locks; on Linux local filesystems `flock` and `fcntl` locks are independent, so
this lock never blocks SQLite, nor readers (`status`, `export`, `show`) beside a live run.

The owner's pid goes in `<database>.pid`, only to tell a second run who holds the store. The
holder writes it under the lock, into a file it has just created (never an existing one, never
through a link), and removes it on release; a missing or odd pid file costs only the pid in
that message, never the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from flow.errors import StoreError, StoreLockedError

PID_SUFFIX = ".pid"
PID_MAX_BYTES = 32
# never follow a link at the last step (the resolved path has none, unless one was swapped in
# since), and never wait on a FIFO put where a file should be
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class StoreLock:
    """An exclusive advisory lock on the store's database file; its pid file names the owner."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.database = Path(os.path.realpath(store_path))
        self.pid_path = self.database.with_name(self.database.name + PID_SUFFIX)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise `StoreLockedError` naming the process that holds it.

        Creates an empty database file if there is none: SQLite takes an empty file as a new
        database, and the lock needs a file to lock."""
        try:
            fd = os.open(self.database, os.O_RDONLY | os.O_CREAT | _OPEN_FLAGS, 0o644)
        except OSError as e:
            raise StoreError(f"{self.store_path}: cannot open the store: "
                             f"{e.strerror or e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{self.store_path}: is not a file; the store must be a "
                                 "SQLite database file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{self.store_path}: another flow run (pid {self._read_owner()}) is using this "
                "store; wait for it to finish or stop it, then run again") from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"{self.store_path}: cannot lock the store: "
                             f"{e.strerror or e}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_owner()

    def release(self) -> None:
        """Give the lock up (the kernel also does so when the process dies).

        Call it only once this process's SQLite connections to the store are closed: closing
        any descriptor of a file drops every POSIX lock the process holds on it, SQLite's too."""
        if self._fd is not None:
            # removed while still locked, so it never removes the next owner's file
            with contextlib.suppress(OSError):
                os.unlink(self.pid_path)
            os.close(self._fd)
            self._fd = None

    def _write_owner(self) -> None:
        """Put our pid in a pid file of our own making; skip it if that cannot be done safely.

        Whatever sits at the pid path (a stale file, a link to someone's file) is unlinked, not
        opened: unlinking a link or a hard link leaves the file it points at untouched."""
        with contextlib.suppress(OSError):
            os.unlink(self.pid_path)
        try:
            fd = os.open(self.pid_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
        except OSError:
            return
        with contextlib.suppress(OSError):
            os.write(fd, str(os.getpid()).encode())
        os.close(fd)

    def _read_owner(self) -> str:
        """The pid in the pid file, or `unknown` if there is no plain file holding one."""
        try:
            fd = os.open(self.pid_path, os.O_RDONLY | _OPEN_FLAGS)
        except OSError:
            return "unknown"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "unknown"
            text = os.read(fd, PID_MAX_BYTES).decode("ascii", "replace").strip()
        except OSError:
            return "unknown"
        finally:
            os.close(fd)
        return text if text.isdigit() else "unknown"
