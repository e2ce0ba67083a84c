"""The limit workers share: a 429 that one worker meets pauses every worker on the key.

Real `SharedLimiter`s, each on its own connection to a real PostgreSQL server (as two worker
processes have), and a real 429 from the simulator; their waits go to a recorder, not to
sleep, so the test waits for nothing.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from flow.config.store_url import StoreURL
from flow.endpoints.chat import classify_status
from flow.errors import RateLimitedError
from flow.simulator import SimulatorThread
from flow.store.postgres.limits import SharedGate, limit_name
from flow.store.postgres.store import PostgresStore
from flow.workers.shared_limiter import SharedLimiter

pytestmark = pytest.mark.slow


class Waits:
    """A stand-in for `asyncio.sleep` that keeps each wait asked for."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)


def rate_limited(base_url: str) -> RateLimitedError:
    """What the simulator answers a request its limit refuses, read as a worker reads it."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "[sim:status=429-30] hello"}]}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", body, {
        "content-type": "application/json", "authorization": "Bearer sk-test"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    error = classify_status(refused.value.code, json.loads(refused.value.read()),
                            dict(refused.value.headers.items()))
    assert isinstance(error, RateLimitedError)
    return error


async def test_a_429_one_worker_meets_pauses_every_worker_on_the_key(
        postgres_url: str, simulator: SimulatorThread) -> None:
    error = rate_limited(simulator.url)
    assert error.retry_after_s == 30
    url = StoreURL(postgres_url)
    first, second = await PostgresStore.open(url), await PostgresStore.open(url)
    name = limit_name("http://sim", "sk-test", "gpt-4o-mini")
    other_key = limit_name("http://sim", "sk-other", "gpt-4o-mini")
    first_waits, second_waits, other_waits = Waits(), Waits(), Waits()
    # no limit configured or learned: a worker takes its requests without a look at others
    seen = SharedLimiter(SharedGate(first._query, name, None, None, first_waits),
                         None, None, None)
    unaware = SharedLimiter(SharedGate(second._query, name, None, None, second_waits),
                            None, None, None)
    elsewhere = SharedLimiter(SharedGate(second._query, other_key, None, None, other_waits),
                              None, None, None)
    try:
        seen.on_rate_limited(error.retry_after_s)  # as the executor does on a 429
        await seen.close()
        await unaware.acquire(10)
        await elsewhere.acquire(10)
    finally:
        await first.close()
        await second.close()
    # the worker that never saw the 429 waits out the pause it asked for, by the shared clock
    assert len(second_waits.asked) == 1 and 25 < second_waits.asked[0] <= 30
    assert other_waits.asked == []  # another key is another limit: not paused
