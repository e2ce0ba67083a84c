"""A worker's stages: each one a lane of its own, run together, the first failure ending all."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from flow.stage import Stage
from flow.store.shards import Waiting


@dataclass
class Lane:
    """One stage's share of a worker: the requests it holds and the items waiting on them."""

    stage: Stage
    leases: dict[str, int] = field(default_factory=dict)  # request key: fencing token
    waiting: dict[str, list[Waiting]] = field(default_factory=dict)


async def all_or_none(runs: list[Coroutine[Any, Any, None]]) -> None:
    """Run every stage's executor; the first to fail ends the others."""
    tasks = [asyncio.ensure_future(run) for run in runs]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def packs(stage: Stage) -> bool:
    """Whether the stage's requests are packed, many to a request (online embeddings)."""
    return stage.config.endpoint == "embeddings" and stage.config.executor != "batch"
