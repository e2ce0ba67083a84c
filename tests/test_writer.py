"""The group writer: results committed in groups, and nobody left waiting for a commit."""

from __future__ import annotations

import asyncio

import pytest

from flow.errors import StoreError
from flow.records import Settled, utc_now
from flow.store.writer import GroupWriter


def _result(key: str) -> Settled:
    return Settled("call", "test", key, utc_now(), None, [], [])


async def test_results_waiting_when_the_writer_stops_fail_rather_than_wait() -> None:
    # a store closed while a commit hangs (its close cancelled midway): the results in that
    # commit and after it were never to be committed, and their savers waited for good
    async def hangs(group: list[Settled]) -> None:
        await asyncio.Event().wait()

    writer = GroupWriter(hangs, lambda e: StoreError(str(e)))
    writer.start()
    saves = [asyncio.create_task(writer.save(_result(key))) for key in ("k1", "k2")]
    await asyncio.sleep(0)  # the first is being committed
    saves.append(asyncio.create_task(writer.save(_result("k3"))))
    await asyncio.sleep(0)
    await writer.stop()
    for save in saves:
        with pytest.raises(StoreError, match="closed before"):
            await asyncio.wait_for(save, 10)
    with pytest.raises(StoreError, match="closed before"):
        await writer.save(_result("k4"))


async def test_results_are_committed_in_groups() -> None:
    groups: list[list[str]] = []

    async def commit(group: list[Settled]) -> None:
        groups.append([settled.call_key for settled in group])

    writer = GroupWriter(commit, lambda e: StoreError(str(e)))
    writer.start()
    await asyncio.gather(*(writer.save(_result(key)) for key in ("k1", "k2", "k3")))
    await writer.flush()
    await writer.stop()
    assert sorted(key for group in groups for key in group) == ["k1", "k2", "k3"]
