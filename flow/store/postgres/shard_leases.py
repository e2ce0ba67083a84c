"""The Batch API executor's book on a shared store: shards cut from the work queue, each
driven by one worker at a time under a lease.

A worker cuts a shard from the queue's pending requests in one transaction (the requests
leased to it, the shard and its lines recorded, `planned`), so a request is in one open
shard only. Each open shard carries a lease (`batches.worker`, `token`, `lease_until`) that
its worker's heartbeat keeps; when it runs out (the worker died or was paused), or at once
when the worker's session is gone (the advisory lock each batch worker holds while it lives
is free), any worker takes the shard over with a new token, and new tokens for its lines'
requests in `work`.
Every state the shard's worker writes is fenced by its token (`ShardLostError` when another
worker holds it now), and every line's result is committed fenced by its request's token, as
an online worker's is: two workers collecting one batch never store a line twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from flow.errors import StoreError
from flow.records import Shard, utc_now
from flow.store.shards import COLUMNS, MUTABLE, SQLiteShards

if TYPE_CHECKING:
    from flow.store.postgres.store import PostgresStore

# pg_advisory_xact_lock key: cutting a shard ("flow", 3). Not the planner's store lock
# ("flow", 2), which a `flow plan` holds while it plans: a cut waited for the whole plan,
# its worker's connection (its heartbeat too) held meanwhile, and a plan that looked while a
# cut held it was refused as if another plan ran
CUT_LOCK = 0x666C6F77_0003
# pg_try_advisory_lock(ALIVE_LOCK, hashtext(worker)): held by each batch worker's session
# while it lives, so others see at once when that session is gone
ALIVE_LOCK = 0x666C6F77
LEASE = "clock_timestamp() + make_interval(secs => %(lease_s)s)"
# pending requests, and requests leased once but in no open shard (an online worker's
# lease that ran out before the stage turned to batches)
WAITING = """
    state <> 'done' AND origin = %(origin)s AND stage = %(stage)s
        AND (state = 'pending' OR (lease_until < clock_timestamp() AND NOT EXISTS (
            SELECT 1 FROM batch_lines JOIN batches ON batches.id = batch_lines.batch
            WHERE batch_lines.request_key = work.request_key AND batch_lines.state = 'pending'
                AND batches.stage = work.stage AND batches.origin = work.origin
                AND batches.state <> 'collected')))"""
PENDING_SQL = f"""
    SELECT request_key, request FROM work WHERE {WAITING}
    ORDER BY origin, stage, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED"""
LEASE_LINES_SQL = f"""
    UPDATE work SET state = 'leased', token = nextval('work_tokens'), worker = %(worker)s,
        lease_until = {LEASE}, claims = work.claims + 1
    WHERE origin = %(origin)s AND stage = %(stage)s AND request_key = ANY(%(keys)s)
    RETURNING request_key, token"""
ADD_SQL = f"""
    INSERT INTO batches (id, stage, origin, endpoint, state, lines, bytes, worst_cost_usd,
                         created_at, updated_at, run_id, worker, token, lease_until)
    SELECT COALESCE(MAX(id), 0) + 1, %(stage)s, %(origin)s, %(endpoint)s, 'planned',
        %(lines)s, %(bytes)s, %(worst)s, %(now)s, %(now)s, %(run_id)s, %(worker)s,
        nextval('work_tokens'), {LEASE}
    FROM batches RETURNING id, token"""
ADD_LINES_SQL = """
    INSERT INTO batch_lines (batch, request_key, request)
    SELECT %s, key, request FROM unnest(%s::text[], %s::text[]) AS line (key, request)"""
# the workers holding shards whose session is gone (their advisory lock is free: the
# process died and the server closed its connection); probed, then let go at once
GONE_SQL = """
    WITH holders AS MATERIALIZED (
        SELECT DISTINCT worker FROM batches WHERE stage = %(stage)s AND origin = %(origin)s
            AND state <> 'collected' AND lease_until >= clock_timestamp()
            AND worker <> %(worker)s),
    gone AS (SELECT worker FROM holders
             WHERE pg_try_advisory_lock(%(lock)s, hashtext(worker)))
    SELECT worker, pg_advisory_unlock(%(lock)s, hashtext(worker)) FROM gone"""
ALIVE_SQL = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
TAKE_SQL = f"""
    WITH picked AS (
        SELECT id FROM batches
        WHERE stage = %(stage)s AND origin = %(origin)s AND state <> 'collected'
            AND (lease_until IS NULL OR lease_until < clock_timestamp()
                 OR worker = ANY(%(gone)s))
            AND NOT id = ANY(%(mine)s)
        ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
    UPDATE batches SET worker = %(worker)s, token = nextval('work_tokens'),
        lease_until = {LEASE}
    FROM picked WHERE batches.id = picked.id
    RETURNING {', '.join(f'batches.{column}' for column in COLUMNS)}, batches.token"""
RETOKEN_SQL = f"""
    UPDATE work SET token = nextval('work_tokens'), worker = %(worker)s,
        lease_until = {LEASE}, claims = work.claims + 1
    FROM batch_lines
    WHERE batch_lines.batch = %(shard)s AND batch_lines.state = 'pending'
        AND work.stage = %(stage)s AND work.origin = %(origin)s
        AND work.request_key = batch_lines.request_key AND work.state = 'leased'
    RETURNING work.request_key, work.token"""
SAVE_SQL = (f"UPDATE batches SET {', '.join(f'{column} = %s' for column in MUTABLE)}, "
            "lease_until = clock_timestamp() + make_interval(secs => %s) "
            "WHERE id = %s AND token = %s RETURNING id")
# the shard's row locked: a take-over waits for the mark, or the mark sees the new token
MARK_SQL = """
    WITH held AS (SELECT id FROM batches WHERE id = %s AND token = %s FOR UPDATE),
    marked AS (UPDATE batch_lines SET state = %s FROM held
               WHERE batch_lines.batch = held.id AND batch_lines.request_key = ANY(%s)
               RETURNING 1)
    SELECT (SELECT COUNT(*) FROM held), (SELECT COUNT(*) FROM marked)"""
HEARTBEAT_SQL = """
    UPDATE batches SET lease_until = clock_timestamp() + make_interval(secs => %s)
    WHERE worker = %s AND state <> 'collected'"""
RELEASE_SQL = "UPDATE batches SET worker = NULL, lease_until = NULL WHERE token = ANY(%s)"
OPEN_SQL = """
    SELECT COUNT(*) FROM batches WHERE state <> 'collected' AND origin = %s
        AND stage = ANY(%s)"""
LEFT_SQL = f"""
    SELECT (SELECT COUNT(*) FROM work WHERE {WAITING}),
           (SELECT COUNT(*) FROM batches WHERE state <> 'collected'
                AND origin = %(origin)s AND stage = %(stage)s)"""


async def open_shards(store: PostgresStore, origin: str, stages: Sequence[str]) -> int:
    """How many shards of these stages are not yet collected, whoever holds them."""
    ((count,),) = await store._query(OPEN_SQL, (origin, list(stages)), raw=True)
    return int(count)


class ShardLostError(StoreError):
    """Another worker took the shard over (this one's lease ran out): it drives it now."""


class SharedShards:
    """The book of one stage's shards on a shared store, as one worker sees it: the
    `ShardBook` the shard driver writes through, every state fenced by the shard's lease."""

    def __init__(self, store: PostgresStore, stage: str, origin: str, lease_s: float) -> None:
        self._store = store
        self._book: SQLiteShards = store.shards
        self._stage = stage
        self._origin = origin
        self.lease_s = lease_s
        self.worker = store.worker
        self.tokens: dict[int, int] = {}  # the shards this worker holds: their tokens
        self.line_tokens: dict[str, int] = {}  # their lines' requests: the tokens in `work`
        # awaited before a shard's state or lines are written: the results delivered
        # before are committed by then
        self.before_write: Callable[[], Awaitable[None]] | None = None
        self._alive_on: object = None  # the connection this worker's alive lock is held on

    async def cut(self, endpoint: str, run_id: int, most: int,
                  keep: Callable[[list[tuple[str, str]]], int],
                  worst_cost: Callable[[str], float], whole: bool = False) -> Shard | None:
        """A new shard of up to `most` requests from the queue, `planned` and leased to this
        worker (`keep`: how many of the oldest fit one batch); None: the queue is empty, or
        (`whole`: more requests may still come) holds less than one full batch."""
        params = {"origin": self._origin, "stage": self._stage, "worker": self.worker,
                  "lease_s": self.lease_s}
        await self.hold_alive()  # before it holds a shard: others see it alive
        async with self._store.transaction("cannot record a batch") as db:
            # one cut at a time: shard ids are numbered in order, as SQLite's are
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (CUT_LOCK,))
            cursor = await db.execute(PENDING_SQL, {**params, "limit": most})
            rows = [(str(key), str(request)) for key, request in await cursor.fetchall()]
            if not rows:
                return None
            lines = rows[:max(1, keep(rows))]
            if whole and len(lines) == len(rows) < most:
                return None
            cursor = await db.execute(LEASE_LINES_SQL, {**params,
                                                        "keys": [key for key, _ in lines]})
            tokens = {str(key): int(token) for key, token in await cursor.fetchall()}
            now = utc_now()
            size = sum(len(request) for _, request in lines)
            worst = sum(worst_cost(request) for _, request in lines)
            cursor = await db.execute(ADD_SQL, {
                **params, "endpoint": endpoint, "lines": len(lines), "bytes": size,
                "worst": worst, "now": now, "run_id": run_id})
            ((shard_id, token),) = await cursor.fetchall()
            await db.execute(ADD_LINES_SQL, (shard_id, [key for key, _ in lines],
                                             [request for _, request in lines]))
        self.tokens[int(shard_id)] = int(token)
        self.line_tokens.update(tokens)
        return Shard(int(shard_id), self._stage, self._origin, endpoint, "planned",
                     len(lines), size, worst, updated_at=now)

    async def take(self) -> Shard | None:
        """An open shard no live worker drives (its lease ran out, or its worker's session
        is gone), now leased to this one with new tokens for it and its lines' requests;
        None: there is none."""
        query = self._store._query
        await self.hold_alive()
        params = {"stage": self._stage, "origin": self._origin, "worker": self.worker,
                  "lock": ALIVE_LOCK}
        gone = [str(worker) for worker, _ in await query(GONE_SQL, params, write=True,
                                                            raw=True)]
        rows = await query(TAKE_SQL, {**params, "lease_s": self.lease_s, "gone": gone,
                                      "mine": list(self.tokens)}, write=True, raw=True)
        if not rows:
            return None
        *values, token = rows[0]
        shard = Shard(*values)
        self.tokens[shard.id] = int(token)
        for key, line_token in await query(RETOKEN_SQL, {
                "shard": shard.id, "stage": self._stage, "origin": self._origin,
                "worker": self.worker, "lease_s": self.lease_s}, write=True, raw=True):
            self.line_tokens[str(key)] = int(line_token)
        return shard

    async def hold_alive(self) -> None:
        """Hold this worker's alive lock on the store's connection (again after a
        reconnect: a new session holds none)."""
        if self._alive_on is not self._store.connection:
            await self._store._query(ALIVE_SQL, (ALIVE_LOCK, self.worker), write=True,
                                     raw=True)
            self._alive_on = self._store.connection

    def _lost(self, shard_id: int) -> ShardLostError:
        """The shard is another worker's now: the error to raise."""
        self.tokens.pop(shard_id, None)
        return ShardLostError(f"batch shard {shard_id}: another worker took it over")

    async def heartbeat(self) -> None:
        """Keep this worker's shards (its lines' requests: `WorkQueue.heartbeat`)."""
        await self.hold_alive()
        await self._store._query(HEARTBEAT_SQL, (self.lease_s, self.worker), write=True,
                                 raw=True)

    async def release(self, shard_ids: Sequence[int]) -> None:
        """Give these shards back (a stop): any worker may take them over at once."""
        tokens = [self.tokens.pop(shard, 0) for shard in shard_ids]
        if tokens:
            await self._store._query(RELEASE_SQL, (tokens,), write=True, raw=True)

    async def requeue(self, keys: Sequence[str]) -> None:
        """Lines a batch did not run: their requests back in the queue, for a new shard."""
        tokens = [self.line_tokens.pop(key) for key in keys if key in self.line_tokens]
        await self._store.queue.release(tokens)

    async def left(self) -> tuple[int, int]:
        """(requests waiting for a shard, shards not yet collected)."""
        ((pending, shards),) = await self._store._query(
            LEFT_SQL, {"origin": self._origin, "stage": self._stage}, raw=True)
        return int(pending), int(shards)

    # the `ShardBook` the driver writes through

    async def open(self, stage: str, origin: str) -> list[Shard]:
        """The stage's shards not yet collected."""
        return await self._book.open(stage, origin)

    async def add(self, stage: str, origin: str, endpoint: str, worst_cost_usd: float | None,
                  lines: Sequence[tuple[str, str]], run_id: int) -> Shard:
        """Never on a shared store: shards are cut from the queue (`cut`)."""
        raise StoreError("a shared store's shards are cut from its queue")

    async def save(self, shard: Shard) -> None:
        """Write where `shard` stands, while this worker holds it (its lease renewed)."""
        if self.before_write is not None:
            await self.before_write()
        shard.updated_at = utc_now()
        rows = await self._store._query(SAVE_SQL, (
            *(getattr(shard, column) for column in MUTABLE), self.lease_s, shard.id,
            self.tokens.get(shard.id, 0)), write=True, raw=True)
        if not rows:
            raise self._lost(shard.id)

    async def lines(self, shard_id: int, states: Sequence[str] = ("pending",)
                    ) -> list[tuple[str, str]]:
        """(request key, request JSON) of the shard's lines in these states."""
        return await self._book.lines(shard_id, states)

    async def held(self, shard_ids: Sequence[int], keys: Sequence[str]) -> set[str]:
        """Those of `keys` these shards hold."""
        return await self._book.held(shard_ids, keys)

    async def mark(self, shard_id: int, keys: Sequence[str], state: str) -> None:
        """Set the state of the shard's lines of `keys`, while this worker holds it (a
        worker that lost it must not mark lines done whose results were refused)."""
        if self.before_write is not None:
            await self.before_write()
        rows = await self._store._query(MARK_SQL, (shard_id, self.tokens.get(shard_id, 0),
                                                   state, list(keys)), write=True, raw=True)
        if not rows[0][0]:
            raise self._lost(shard_id)

    async def forget_requests(self, shard_id: int) -> None:
        """A collected shard's request copies dropped; its lease too."""
        await self._book.forget_requests(shard_id)
        self.tokens.pop(shard_id, None)

    async def collected(self, batch_id: str) -> set[str]:
        """The request keys whose reply from this batch is stored already."""
        return await self._book.collected(batch_id)
