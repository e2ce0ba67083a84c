"""`flow cancel`: cancel a pipeline's open batches at the provider.

Only the cancel is sent: the run that collects afterwards (the next `flow run`) keeps every
line the batch finished, at batch prices, and sends the cancelled lines again.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import openai

from flow.config.store_url import StoreURL
from flow.errors import StoreError
from flow.store.read_only import read_only_uri


@dataclass(slots=True)
class Cancelled:
    """One batch asked to stop: its shard, the provider's id, and its status after."""

    shard: int
    stage: str
    batch_id: str
    status: str


OPEN_SQL = ("SELECT id, stage, batch_id FROM batches WHERE state = 'submitted' "
            "AND batch_id IS NOT NULL ORDER BY id")


def open_batches(store: Path | StoreURL) -> list[tuple[int, str, str]]:
    """(shard, stage, batch id) of every batch the store has submitted and not collected."""
    if isinstance(store, StoreURL):  # PostgreSQL: read as the read commands read it
        from flow.report import open_read_only

        with open_read_only(store) as db:
            rows = db.execute(OPEN_SQL).fetchall()
        return [(int(shard), str(stage), str(batch_id)) for shard, stage, batch_id in rows]
    if not store.exists():
        raise StoreError(f"{store}: no store yet; run the pipeline first")
    try:
        with sqlite3.connect(read_only_uri(store), uri=True) as db:
            rows = db.execute(OPEN_SQL).fetchall()
    except sqlite3.Error as e:
        raise StoreError(f"{store}: cannot read its batches ({e}); run the pipeline once "
                         "with this version of flow") from None
    return [(int(shard), str(stage), str(batch_id)) for shard, stage, batch_id in rows]


async def cancel_batches(store: Path | StoreURL, client: openai.AsyncOpenAI
                         ) -> list[Cancelled]:
    """Ask the provider to cancel each open batch of `store`; what each became."""
    cancelled = []
    for shard, stage, batch_id in open_batches(store):
        status: str
        try:
            batch = await client.batches.cancel(batch_id)
            status = batch.status
        except openai.APIStatusError as e:  # already finished: nothing to cancel
            status = f"not cancelled ({e.status_code}: {e.message})"
        cancelled.append(Cancelled(shard, stage, batch_id, status))
    return cancelled
