"""Where the Batch API executor works: the store's book of shards, and the run it serves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from flow.records import Shard


class ShardBook(Protocol):
    """What the executor keeps in the store (`flow.store.shards.SQLiteShards`)."""

    async def open(self, stage: str, origin: str) -> list[Shard]: ...

    async def add(self, stage: str, origin: str, endpoint: str, worst_cost_usd: float | None,
                  lines: Sequence[tuple[str, str]], run_id: int) -> Shard: ...

    async def save(self, shard: Shard) -> None: ...

    async def lines(self, shard_id: int, states: Sequence[str] = ...
                    ) -> list[tuple[str, str]]: ...

    async def held(self, shard_ids: Sequence[int], keys: Sequence[str]) -> set[str]: ...

    async def mark(self, shard_id: int, keys: Sequence[str], state: str) -> None: ...

    async def forget_requests(self, shard_id: int) -> None: ...

    async def collected(self, batch_id: str) -> set[str]: ...


@dataclass
class BatchRun:
    """Where the executor works: the store's book, the stage and origin, and the run."""

    book: ShardBook
    stage: str
    origin: str
    store_tag: str  # names the store in each batch's metadata
    run_id: int
    # before each create: whether a shard that may cost this much is within the budget
    may_spend: Callable[[float], bool]
    worst_cost: Callable[[str], float]  # of one request, at batch prices
    worst_tokens: Callable[[str], int]  # of one request: its prompt and `max_tokens`
    url: str  # the endpoint every line of its batches goes to (`batch_shard.URLS`)
