"""The hand-over between stages: bounded, ended by the sender, closed by a reader that stops."""

from __future__ import annotations

import asyncio

from flow.inbox import Inbox


async def test_a_sender_waits_for_room_and_the_reader_takes_in_order() -> None:
    inbox: Inbox[int] = Inbox(limit=2)
    await inbox.put([1, 2])
    third = asyncio.create_task(inbox.put([3]))
    await asyncio.sleep(0)
    assert not third.done()  # full: the stage before waits
    assert await inbox.take(1) == [1]
    await third
    assert await inbox.take(10) == [2, 3]


async def test_the_reader_gets_what_is_left_then_none_once_ended() -> None:
    inbox: Inbox[int] = Inbox(limit=10)
    taking = asyncio.create_task(inbox.take(5))
    await asyncio.sleep(0)
    assert not taking.done()  # nothing yet: the reader waits for the first item
    await inbox.put([7])
    assert await taking == [7]
    await inbox.put([8])
    await inbox.end()
    assert await inbox.take(5) == [8]
    assert await inbox.take(5) is None


async def test_closed_by_its_reader_a_sender_never_waits_and_items_are_dropped() -> None:
    inbox: Inbox[int] = Inbox(limit=1)
    await inbox.put([1])
    waiting = asyncio.create_task(inbox.put([2]))
    await asyncio.sleep(0)
    await inbox.close()
    await asyncio.wait_for(waiting, 1)
    await inbox.put([3])
    assert await inbox.take(5) is None
