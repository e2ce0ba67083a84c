"""The store: what a run keeps, behind one interface, with SQLite beneath it today.

`Store` names everything the run, the planner and the dry run ask of a store, so a second
implementation (PostgreSQL, shared by many workers) can sit beside `SQLiteStore` and pass
the same contract tests. Reports read only the documented tables and the `results` view.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from flow.plan import PlanStore
from flow.records import Settled
from flow.store.sqlite import SQLiteStore


class Store(PlanStore, Protocol):
    """What a run needs of a store, beyond planning."""

    @property
    def run_id(self) -> int: ...

    async def start_run(self, pipeline: Path, origin: str, endpoint: str) -> int: ...

    async def finish_run(self, state: str, message: str | None,
                         counts: dict[str, int]) -> None: ...

    async def spent_usd(self, origin: str) -> float: ...

    async def begin_seen_ids(self) -> None: ...

    async def forget_unseen(self, stage: str) -> int: ...

    async def reply_bodies(self, response_ids: Iterable[int]) -> dict[int, str]: ...

    async def save(self, settled: Settled) -> None: ...

    async def close(self) -> None: ...


async def open_store(path: Path, busy_timeout_s: float = 5.0) -> Store:
    """The store at `path`, locked for this run and migrated to the current schema."""
    return await SQLiteStore.open(path, busy_timeout_s)


async def open_store_read_only(path: Path) -> Store:
    """The store at `path`, to look at beside a live run; nothing is written."""
    return await SQLiteStore.open_read_only(path)
