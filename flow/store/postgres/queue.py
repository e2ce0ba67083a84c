"""The work queue on a shared store: each distinct request to send, leased to one worker.

`flow plan` puts each request an item needs into `work` once (`enqueue`); workers take
batches of them (`claim`, `FOR UPDATE SKIP LOCKED`: two workers never take one request),
each with a lease until a time on the database's clock and a fencing token from a sequence.
A worker beats its heart to keep its leases; a worker that dies (or is paused past its
lease) loses them, and another takes the requests. A result is written only while its
lease is still the worker's (`FENCE_SQL`, in the result's own commit: `group.py`), so a worker that comes
back late never overwrites or duplicates a result: its paid reply is kept as an attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

Query = Callable[..., Awaitable[list[Any]]]

ENQUEUE_SQL = """
    INSERT INTO work (stage, origin, request_key, request)
    SELECT %s, %s, key, request FROM unnest(%s::text[], %s::text[]) AS new (key, request)
    ON CONFLICT (stage, origin, request_key) DO UPDATE
        SET state = 'pending', token = NULL, worker = NULL, lease_until = NULL,
            request = EXCLUDED.request
        WHERE work.state = 'done'
    RETURNING request_key"""
# a request a worker hands on (a later stage of a chain): a done one is pending again only
# when no reply to it is stored (it failed unpaid), so a hand-on that raced the request's
# commit never buys it twice; the item is made from the stored reply instead (`stranded`)
ENQUEUE_ONCE_SQL = """
    INSERT INTO work (stage, origin, request_key, request)
    SELECT %s, %s, key, request FROM unnest(%s::text[], %s::text[]) AS new (key, request)
    ON CONFLICT (stage, origin, request_key) DO UPDATE
        SET state = 'pending', token = NULL, worker = NULL, lease_until = NULL,
            request = EXCLUDED.request
        WHERE work.state = 'done' AND NOT EXISTS (SELECT 1 FROM responses
            WHERE responses.request_key = work.request_key AND responses.origin = work.origin)
    RETURNING request_key"""
# items a later stage lacks: done (or skipped) at the stage before, and at this one never
# recorded, or recorded with no output and no request pending or leased for them (a worker
# killed between its commit and the hand-on, or a claim that looked before they came)
STRANDED_SQL = """
    SELECT before.item_id, before.row, first.input FROM items AS before
    JOIN items AS first ON first.stage = %(first)s AND first.item_id = before.item_id
    LEFT JOIN outputs AS made ON made.stage = before.stage AND made.item_id = before.item_id
        AND made.request_key = before.request_key AND made.origin = before.origin
    LEFT JOIN items AS here ON here.stage = %(stage)s AND here.item_id = before.item_id
    WHERE before.stage = %(before)s AND before.origin = %(origin)s
        AND before.error_class IS NULL AND (before.skipped <> 0 OR made.status = 'done')
        AND before.row > %(after)s
        AND (here.item_id IS NULL OR (here.skipped = 0 AND here.error_class IS NULL
            AND NOT EXISTS (SELECT 1 FROM outputs WHERE outputs.stage = here.stage
                AND outputs.item_id = here.item_id AND outputs.request_key = here.request_key
                AND outputs.origin = here.origin)
            AND NOT EXISTS (SELECT 1 FROM work WHERE work.stage = here.stage
                AND work.origin = here.origin AND work.request_key = here.request_key
                AND work.state <> 'done')))
    ORDER BY before.row LIMIT %(limit)s"""
CLAIM_SQL = """
    WITH picked AS (
        SELECT stage, origin, request_key FROM work
        WHERE state <> 'done' AND origin = %(origin)s AND stage = ANY(%(stages)s)
            AND (state = 'pending' OR lease_until < clock_timestamp()
                 -- leased to this worker by a claim whose answer it never got (the
                 -- connection broke): its own, but unknown to it
                 OR (worker = %(worker)s AND NOT token = ANY(%(held)s)))
        ORDER BY origin, stage, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
    UPDATE work SET state = 'leased', token = nextval('work_tokens'), worker = %(worker)s,
        lease_until = clock_timestamp() + make_interval(secs => %(lease_s)s),
        claims = work.claims + 1
    FROM picked WHERE work.stage = picked.stage AND work.origin = picked.origin
        AND work.request_key = picked.request_key
    RETURNING work.stage, work.request_key, work.request, work.token"""
# rows locked by another transaction are skipped, not waited for: this worker's own commit
# (they are done once it ends; the next beat keeps any it did not end) or another worker's
# claim (theirs once it ends). Waiting, a beat held the worker's connection behind a slow
# commit, and could deadlock with it (each locks its rows in its own order)
HEARTBEAT_SQL = """
    UPDATE work SET lease_until = clock_timestamp() + make_interval(secs => %s)
    WHERE (stage, origin, request_key) IN (
        SELECT stage, origin, request_key FROM work WHERE worker = %s AND state = 'leased'
        FOR UPDATE SKIP LOCKED)"""
RELEASE_SQL = """
    UPDATE work SET state = 'pending', worker = NULL, lease_until = NULL
    WHERE token = ANY(%s) AND state = 'leased'"""
FENCE_SQL = """
    UPDATE work SET state = 'done', finished_at = clock_timestamp(), lease_until = NULL
    WHERE token = ANY(%s) AND state = 'leased' RETURNING token"""
LANDED_SQL = "SELECT token FROM work WHERE token = ANY(%s) AND state = 'done'"
LEFT_SQL = """
    SELECT COUNT(*) FILTER (WHERE state = 'pending' OR lease_until < clock_timestamp()),
           COUNT(*) FILTER (WHERE state = 'leased' AND lease_until >= clock_timestamp())
    FROM work WHERE state <> 'done' AND origin = %s AND stage = ANY(%s)"""
# the sessions still holding the row of a request whose lease ran out `grace` seconds ago: a
# worker paused inside its commit whose session the server has not ended (seen under load:
# `idle in transaction` past its timeout). Ended, its locks go and the request is claimed;
# the worker, back, writes its results again and the fence refuses them (kept as attempts)
STUCK_SQL = """
    SELECT pg_terminate_backend(locks.pid) FROM work
    JOIN pg_locks AS locks ON locks.locktype = 'transactionid' AND locks.granted
        AND locks.transactionid = work.xmax
    WHERE work.state = 'leased' AND work.origin = %s AND work.stage = ANY(%s)
        AND work.lease_until < clock_timestamp() - make_interval(secs => %s)
        AND locks.pid <> pg_backend_pid()"""


@dataclass(slots=True)
class Claimed:
    """A request leased to this worker."""

    stage: str
    key: str
    request_json: str
    token: int


class WorkQueue:
    """The store's `work` table, as one worker sees it."""

    def __init__(self, query: Query, worker: str) -> None:
        self._query = query
        self.worker = worker
        self.run_id = 0

    async def enqueue(self, stage: str, origin: str, calls: Sequence[tuple[str, str]],
                      paid_again: bool = True) -> int:
        """Put each (request key, request JSON) in the queue, once; a request done before
        and needed again (a retry) is pending again, unless `paid_again` is false and a
        reply to it is stored. How many are newly pending."""
        unique = dict(calls)  # items that share a request bring it more than once
        if not unique:
            return 0
        rows = await self._query(ENQUEUE_SQL if paid_again else ENQUEUE_ONCE_SQL,
                                 (stage, origin, list(unique), list(unique.values())),
                                 write=True, raw=True)
        return len(rows)

    async def stranded(self, origin: str, stages: Sequence[str], index: int, after: int,
                       limit: int) -> list[tuple[str, int, str | None]]:
        """Up to `limit` items after row `after` that stage `index` (a later stage) lacks:
        (item id, row, the row's input as the first stage keeps it), in row order."""
        rows = await self._query(STRANDED_SQL, {
            "first": stages[0], "before": stages[index - 1], "stage": stages[index],
            "origin": origin, "after": after, "limit": limit}, raw=True)
        return [(str(item_id), int(row), text) for item_id, row, text in rows]

    async def claim(self, origin: str, stages: Sequence[str], limit: int, lease_s: float,
                    held: Sequence[int] = ()) -> list[Claimed]:
        """Lease up to `limit` requests no live worker holds, oldest first; `held`: the
        tokens this worker holds now (any other lease in its name is lost to it)."""
        rows = await self._query(CLAIM_SQL, {
            "origin": origin, "stages": list(stages), "limit": limit, "worker": self.worker,
            "lease_s": lease_s, "held": list(held)}, write=True, raw=True)
        return [Claimed(stage, key, request, int(token)) for stage, key, request, token in rows]

    async def heartbeat(self, lease_s: float) -> None:
        """Keep this worker's leases (and its run marked alive) for `lease_s` more."""
        await self._query(HEARTBEAT_SQL, (lease_s, self.worker), write=True, raw=True)
        if self.run_id:
            await self._query("UPDATE runs SET heartbeat_at = now() WHERE id = %s",
                              (self.run_id,), write=True, raw=True)

    async def release(self, tokens: Sequence[int]) -> None:
        """Give back leases whose requests were not sent (a stop): others may take them."""
        if tokens:
            await self._query(RELEASE_SQL, (list(tokens),), write=True, raw=True)

    async def end_stuck(self, origin: str, stages: Sequence[str], grace_s: float) -> int:
        """End the sessions that hold requests whose lease ran out `grace_s` ago (`STUCK_SQL`);
        how many were ended."""
        return len(await self._query(STUCK_SQL, (origin, list(stages), grace_s), raw=True))

    async def left(self, origin: str, stages: Sequence[str]) -> tuple[int, int]:
        """(requests free to claim now, requests leased by live workers)."""
        ((free, leased),) = await self._query(LEFT_SQL, (origin, list(stages)), raw=True)
        return int(free), int(leased)
