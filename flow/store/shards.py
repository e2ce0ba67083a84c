"""The Batch API executor's book in the SQLite store: each shard, its lines and its state,
and the items waiting on a shard's results (found by request key when it is collected).

Every step of a shard's life is written here before the next is taken (the intent to create
a batch is on disk before `batches.create` is sent), so a process killed at any moment
leaves a state the next run can resume from without creating a second batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from flow.records import Shard, utc_now

Query = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]
Write = Callable[[str, list[tuple[str, list[Any]]]], Awaitable[None]]
COLUMNS = ("id", "stage", "origin", "endpoint", "state", "lines", "bytes", "worst_cost_usd",
           "file_id", "batch_id", "status", "completed", "failed", "output_file_id",
           "error_file_id", "error", "updated_at")
MUTABLE = COLUMNS[4:]
CHUNK = 5000
# an item waiting on a request: (item id, row, request key, the row's input as the first
# stage keeps it, the reply of its output, whether it paid for that reply)
Waiting = tuple[str, int, str, str | None, int | None, bool]


class SQLiteShards:
    """Shards and their lines, read and written through the store's connection."""

    def __init__(self, query: Query, write: Write) -> None:
        self._query = query
        self._write = write

    async def open(self, stage: str, origin: str) -> list[Shard]:
        """The stage's shards not yet collected, oldest first."""
        rows = await self._query(
            f"SELECT {', '.join(COLUMNS)} FROM batches WHERE stage = ? AND origin = ? "
            "AND state != 'collected' ORDER BY id", (stage, origin))
        return [Shard(*row) for row in rows]

    async def add(self, stage: str, origin: str, endpoint: str, worst_cost_usd: float | None,
                  lines: Sequence[tuple[str, str]], run_id: int) -> Shard:
        """Record a new shard of `lines` (request key, request JSON), `planned`."""
        ((next_id,),) = await self._query("SELECT COALESCE(MAX(id), 0) + 1 FROM batches", ())
        now = utc_now()
        size = sum(len(request) for _, request in lines)
        shard = Shard(int(next_id), stage, origin, endpoint, "planned", len(lines), size,
                      worst_cost_usd, updated_at=now)
        statements: list[tuple[str, list[Any]]] = [(
            "INSERT INTO batches (id, stage, origin, endpoint, state, lines, bytes, "
            "worst_cost_usd, created_at, updated_at, run_id) VALUES "
            "(?, ?, ?, ?, 'planned', ?, ?, ?, ?, ?, ?)",
            [shard.id, stage, origin, endpoint, shard.lines, size, worst_cost_usd, now, now,
             run_id])]
        for start in range(0, len(lines), CHUNK):
            chunk = lines[start:start + CHUNK]
            statements.append((
                "INSERT INTO batch_lines (batch, request_key, request) VALUES "
                + ", ".join(["(?, ?, ?)"] * len(chunk)),
                [value for key, request in chunk for value in (shard.id, key, request)]))
        await self._write("cannot record a batch", statements)
        return shard

    async def save(self, shard: Shard) -> None:
        """Write where `shard` stands now."""
        shard.updated_at = utc_now()
        sets = ", ".join(f"{column} = ?" for column in MUTABLE)
        await self._write("cannot record a batch's state", [(
            f"UPDATE batches SET {sets} WHERE id = ?",
            [*(getattr(shard, column) for column in MUTABLE), shard.id])])

    async def lines(self, shard_id: int, states: Sequence[str] = ("pending",)
                    ) -> list[tuple[str, str]]:
        """(request key, request JSON) of the shard's lines in these states, in key order."""
        marks = ", ".join("?" * len(states))
        return [(str(key), str(request)) for key, request in await self._query(
            f"SELECT request_key, request FROM batch_lines WHERE batch = ? AND state IN "
            f"({marks}) ORDER BY request_key", (shard_id, *states))]

    async def held(self, shard_ids: Sequence[int], keys: Sequence[str]) -> set[str]:
        """Those of `keys` that one of these shards holds, pending or done (a request a
        batch of this run answered needs no second batch, whichever came first)."""
        found: set[str] = set()
        if not shard_ids:
            return found
        shards = ", ".join(str(int(shard)) for shard in shard_ids)
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start:start + CHUNK]
            marks = ", ".join("?" * len(chunk))
            found.update(key for (key,) in await self._query(
                f"SELECT request_key FROM batch_lines WHERE request_key IN ({marks}) "
                f"AND state IN ('pending', 'done') AND batch IN ({shards})", chunk))
        return found

    async def mark(self, shard_id: int, keys: Sequence[str], state: str) -> None:
        """Set the state of the shard's lines of `keys` (done, failed, requeued)."""
        statements = []
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start:start + CHUNK]
            statements.append((
                f"UPDATE batch_lines SET state = ? WHERE batch = ? AND request_key IN "
                f"({', '.join('?' * len(chunk))})", [state, shard_id, *chunk]))
        if statements:
            await self._write("cannot record a batch's lines", statements)

    async def forget_requests(self, shard_id: int) -> None:
        """A collected shard's requests are in `responses` (or failed): drop the copies."""
        await self._write("cannot record a batch's lines", [(
            "UPDATE batch_lines SET request = NULL WHERE batch = ?", [shard_id])])

    async def collected(self, batch_id: str) -> set[str]:
        """The request keys whose reply from this batch is stored already."""
        return {key for (key,) in await self._query(
            "SELECT request_key FROM responses WHERE batch_id = ?", (batch_id,))}

    async def waiting_on(self, stage: str, origin: str, keys: Sequence[str],
                         first: str) -> list[Waiting]:
        """The items of `stage` whose request is one of `keys`: (item id, row, request key,
        the row's input as the first stage keeps it, the reply of its output, bought)."""
        found = []
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start:start + CHUNK]
            marks = ",".join("?" * len(chunk))
            for item_id, row, key, text, response_id, bought in await self._query(
                    f"SELECT items.item_id, items.row, items.request_key, first.input, "
                    f"outputs.response_id, outputs.bought FROM items "
                    f"JOIN items AS first ON first.stage = ? AND first.item_id = items.item_id "
                    f"LEFT JOIN outputs ON outputs.stage = items.stage "
                    f"AND outputs.item_id = items.item_id WHERE items.request_key IN ({marks}) "
                    f"AND items.origin = ? AND items.stage = ?", (first, *chunk, origin, stage)):
                found.append((item_id, int(row), key, text, response_id, bool(bought)))
        return found

    async def outputs_of(self, item_ids: Sequence[str],
                         stages: Sequence[str]) -> dict[str, dict[str, str]]:
        """The done outputs (JSON) of these items at these stages: {item: {stage: output}}."""
        found: dict[str, dict[str, str]] = {}
        if not stages:
            return found
        for start in range(0, len(item_ids), CHUNK):
            chunk = item_ids[start:start + CHUNK]
            marks = ",".join("?" * len(chunk))
            stage_marks = ",".join("?" * len(stages))
            for item_id, stage, output in await self._query(
                    f"SELECT item_id, stage, output FROM results WHERE item_id IN ({marks}) "
                    f"AND stage IN ({stage_marks}) AND status = 'done'", (*chunk, *stages)):
                found.setdefault(item_id, {})[stage] = output
        return found
