"""A worker's limiter: its own pace, behind the limit every worker shares.

Each request first takes its slot of the shared limit (`SharedGate`, in the store), then
its turn in this worker's `RateLimiter`, which still reads the headers and the 429s: limits
it learns are written to the shared row, and a 429 pauses every worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any

from flow.limiter import RateLimiter, Reservation
from flow.store.postgres.limits import SharedGate
from flow.tokens import OutputReserve

PAUSE_S = 1.0  # after a 429 that names no wait


class SharedLimiter(RateLimiter):
    """`RateLimiter` whose every request also takes a slot of the shared limit."""

    def __init__(self, gate: SharedGate, rpm: int | None, tpm: int | None,
                 reserve: OutputReserve | None) -> None:
        super().__init__(rpm, tpm, reserve=reserve)
        self._gate = gate
        self._output_reserve = reserve
        self._writes: set[asyncio.Task[None]] = set()

    async def acquire(self, prompt_tokens: int) -> Reservation:
        """Wait for the shared slot, then for this worker's own turn."""
        reserve = self._output_reserve.tokens() if self._output_reserve is not None else 0
        await self._gate.take(prompt_tokens + reserve)
        return await super().acquire(prompt_tokens)

    def observe(self, headers: Mapping[str, str] | None, reached_server: bool = True,
                reservation: Reservation | None = None) -> None:
        """Learn from the headers as ever; limits learned go to the shared row."""
        super().observe(headers, reached_server, reservation)
        if headers:
            self._write(self._gate.learn(self._learned["requests"], self._learned["tokens"]))

    def on_rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: this worker slows as ever, and every worker pauses."""
        super().on_rate_limited(retry_after_s)
        self._write(self._gate.pause(retry_after_s if retry_after_s is not None else PAUSE_S))

    async def close(self) -> None:
        """Wait for the shared row's last writes."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _write(self, write: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
