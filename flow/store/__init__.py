"""The store: what a run keeps, behind one interface, with SQLite beneath it today.

`Store` names everything the run, the planner and the dry run ask of a store, so a second
implementation (PostgreSQL, shared by many workers) can sit beside `SQLiteStore` and pass
the same contract tests. Reports read only the documented tables and the `results` view.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from flow.errors import ConfigError, FlowError
from flow.plan import PlanStore
from flow.records import Settled
from flow.store.shards import SQLiteShards
from flow.store.sqlite import SQLiteStore


class Store(PlanStore, Protocol):
    """What a run needs of a store, beyond planning."""

    @property
    def run_id(self) -> int: ...

    async def start_run(self, pipeline: Path, origin: str, endpoint: str) -> int: ...

    async def finish_run(self, state: str, message: str | None, counts: dict[str, int],
                         stages: Sequence[str] = ...) -> None: ...

    async def last_pipeline(self) -> str | None: ...

    async def failed_classes(self, stage: str) -> dict[str, int]: ...

    async def origins(self) -> list[str]: ...

    async def store_id(self) -> str: ...

    async def spent_usd(self, origin: str) -> float: ...

    async def begin_seen_ids(self) -> None: ...

    async def forget_unseen(self, stage: str, seen: int = 0) -> int: ...

    async def begin_rendering(self, stage: str, fingerprint: str) -> bool: ...

    async def end_rendering(self, stage: str, fingerprint: str) -> None: ...

    async def see_unchanged(self, stage: str, origin: str, post_key: str,
                            rows: Sequence[tuple[str, int, str | None]],
                            with_output: bool = ...
                            ) -> tuple[dict[str, int], dict[str, str | None]]: ...

    async def forget_stages(self, stages: Sequence[str]) -> int: ...

    async def reply_bodies(self, response_ids: Iterable[int]) -> dict[int, str]: ...

    async def stored_replies(self, origin: str,
                             keys: Sequence[str]) -> dict[str, tuple[int, str]]: ...

    @property
    def shards(self) -> SQLiteShards: ...

    async def save(self, settled: Settled) -> None: ...

    async def close(self) -> None: ...


async def open_store(path: Path, busy_timeout_s: float = 5.0) -> Store:
    """The store at `path`, locked for this run and migrated to the current schema."""
    return await SQLiteStore.open(path, busy_timeout_s)


def check_owner(other: str | None, store_path: Path, pipeline: Path, take_over: bool) -> None:
    """A `ConfigError` when the store's latest run came from another pipeline file (`other`) that still
    exists: the two would replace each other's items. A pipeline file that was moved or
    renamed (the old one is gone) takes its store over, as does `--take-over-store`."""
    if other is None or other == str(pipeline) or take_over:
        return
    if not os.path.isabs(other) or not os.path.exists(other) or os.path.samefile(other, pipeline):
        return
    raise ConfigError(
        f"{store_path}: this store holds the items of another pipeline, {other}; two "
        f"pipelines on one store would replace each other's items. Give {pipeline.name} a "
        "`store:` of its own, or run it with --take-over-store to make the store its own "
        "(items the other pipeline's input has and this one's does not leave the results; "
        "every paid reply stays in the store)")


def check_error_class(error_class: str, present: dict[str, int]) -> None:
    """A `FlowError` when no failed item has `error_class`, listing the classes there are."""
    if error_class in present:
        return
    listed = ", ".join(f"{name} ({count:,})" for name, count in sorted(present.items()))
    raise FlowError(f"--error-class {error_class}: no failed item has this class; "
                    + (f"the failed items have: {listed}" if listed else "no item has failed"))


async def open_store_read_only(path: Path) -> Store:
    """The store at `path`, to look at beside a live run; nothing is written."""
    return await SQLiteStore.open_read_only(path)
