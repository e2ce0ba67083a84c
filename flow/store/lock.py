"""One live run per store: an advisory lock on `<store>.lock`, released by the kernel however
the process dies, holding the owner's pid so a second run can say who has it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from flow.errors import StoreError, StoreLockedError


class StoreLock:
    """An exclusive advisory lock on `<store>.lock`, holding the owner's pid."""

    def __init__(self, store_path: Path) -> None:
        self.path = store_path.with_name(store_path.name + ".lock")
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise `StoreLockedError` naming the process that holds it."""
        try:
            handle = self.path.open("a+")
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the lock file: {e.strerror or e}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise StoreLockedError(
                f"{self.path.with_suffix('')}: another flow run (pid {owner}) is using this "
                "store; wait for it to finish or stop it, then run again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Give the lock up (the kernel also does so when the process dies)."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

