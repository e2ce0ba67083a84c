"""One rate limit shared by every worker on every machine, held in the store.

A row of `limits` per endpoint, API key and model (so a pool of keys is a pool of limits):
the limits configured or learned from response headers, the next free slot for requests and
for tokens, and the pause after a 429. `flow_take` (in `schema.py`) gives each request its
slot on the database's clock, read inside the row's lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

Query = Callable[..., Awaitable[list[Any]]]
SHARE = 0.98  # of each limit: slots a little apart, so a late send never tips a window over

TAKE_SQL = "SELECT flow_take(%s, %s, %s, %s, %s)"
# a limit to keep, or a pause to honour: then every request takes its slot
LIMITED_SQL = ("SELECT rpm IS NOT NULL OR tpm IS NOT NULL OR paused_until > "
               "extract(epoch FROM clock_timestamp()) FROM limits WHERE name = %s")
LOOK_S = 1.0  # how often a worker without a limit looks whether another has learned one
LEARN_SQL = ("INSERT INTO limits (name, rpm, tpm) VALUES (%s, %s, %s) ON CONFLICT (name) DO "
             "UPDATE SET rpm = COALESCE(EXCLUDED.rpm, limits.rpm), tpm = COALESCE(EXCLUDED.tpm, "
             "limits.tpm)")
PAUSE_SQL = ("INSERT INTO limits (name, paused_until, rate_limited) VALUES "
             "(%s, extract(epoch FROM clock_timestamp()) + %s, 1) ON CONFLICT (name) DO UPDATE "
             "SET paused_until = GREATEST(limits.paused_until, EXCLUDED.paused_until), "
             "rate_limited = limits.rate_limited + 1")


def limit_name(origin: str, api_key: str, model: str) -> str:
    """The shared limit's name: the endpoint, a digest of the key (never the key), the model."""
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:12]
    return f"{origin} key:{digest} {model}"


class SharedGate:
    """A worker's door to the shared limit: `take` waits for a request's slot."""

    def __init__(self, query: Query, name: str, rpm: int | None, tpm: int | None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._query = query
        self.name = name
        self._rpm = rpm
        self._tpm = tpm
        self._sleep = sleep
        self._learned: tuple[int | None, int | None] = (None, None)
        self._known = False
        self._looked_at = -LOOK_S

    async def take(self, tokens: int) -> float:
        """Wait for the next slot of one request of `tokens`; the seconds waited."""
        if self._rpm is None and self._tpm is None and not await self._limited():
            return 0.0  # no limit known to any worker yet: nothing to share
        ((wait,),) = await self._query(TAKE_SQL, (self.name, tokens, self._rpm, self._tpm,
                                                  SHARE), write=True, raw=True)
        wait = float(wait)
        if wait > 0:
            await self._sleep(wait)
        return max(wait, 0.0)

    async def _limited(self) -> bool:
        """Whether the shared row holds a limit or a pause (looked at once a second at most)."""
        now = time.monotonic()
        if now - self._looked_at >= LOOK_S:
            self._looked_at = now
            rows = await self._query(LIMITED_SQL, (self.name,), raw=True)
            self._known = bool(rows and rows[0][0])
        return self._known

    async def learn(self, rpm: int | None, tpm: int | None) -> None:
        """Limits a response's headers named: every worker paces by them from now on."""
        if (rpm, tpm) == self._learned:
            return
        self._learned = (rpm, tpm)
        self._known = self._known or rpm is not None or tpm is not None
        await self._query(LEARN_SQL, (self.name, rpm, tpm), write=True, raw=True)

    async def pause(self, seconds: float) -> None:
        """A 429: every worker waits `seconds` before its next request."""
        await self._query(PAUSE_SQL, (self.name, seconds), write=True, raw=True)
