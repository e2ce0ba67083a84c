"""A stage's online sending (its SDK client and online executor), made when first needed.

Importing the SDK and its transport takes half a second, and a client reads the system's
certificates as it is made: a run with nothing to send (every item done before) needs
neither. An online stage's executor is made for the first call the stage plans, or the
first re-ask; a batch stage makes its client at once (it collects its batches either way).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING

from flow.config import CallConfig
from flow.execute import Deliver, Executor, ExecutorCounters, calls_of
from flow.limiter import RateLimiter
from flow.records import Call, CallResult

if TYPE_CHECKING:
    import openai

    from flow.execute.online import OnlineExecutor
    from flow.execute.packing import PackingExecutor


class StageSender:
    """A stage's client and executors, each made the first time it is asked for; every
    executor's counts go into `counted` as it is made."""

    def __init__(self, config: CallConfig, base_url: str | None, api_key: str,
                 limiter: RateLimiter, stop: asyncio.Event,
                 counted: list[ExecutorCounters]) -> None:
        self._config = config
        self._base_url = base_url
        self._api_key = api_key
        self._limiter = limiter
        self._stop = stop
        self._counted = counted
        self._client: openai.AsyncOpenAI | None = None
        self._online: OnlineExecutor | None = None
        self._packing: PackingExecutor | None = None

    def client(self) -> openai.AsyncOpenAI:
        """The stage's SDK client (the SDK is imported here, the first time)."""
        if self._client is None:
            from flow.execute.client import make_client

            self._client = make_client(self._config, self._base_url, self._api_key)
        return self._client

    def online(self) -> OnlineExecutor:
        """The executor of the stage's re-asks, and of an online stage's calls."""
        if self._online is None:
            self._online = self._online_for(self._config)
        return self._online

    def packing(self) -> PackingExecutor:
        """An embeddings stage's executor: inputs packed into requests, sent through an
        online executor of its own."""
        if self._packing is None:
            from flow.execute.packing import PackingExecutor, packed_config

            self._packing = PackingExecutor(self._config,
                                            self._online_for(packed_config(self._config)))
        return self._packing

    def now(self) -> Executor:
        """What sends the stage's calls now: its online executor, or for embeddings
        `packing`."""
        return self.packing() if self._config.endpoint == "embeddings" else self.online()

    async def reask(self, call: Call) -> CallResult:
        """Send one re-ask online."""
        return await self.online().call(call)

    async def execute(self, calls: AsyncIterable[Call | None], deliver: Deliver) -> None:
        """Send the stage's calls now (`now`), made for the first of them; a `FLUSH` in
        `calls` sends a pack as it is (only the online executor's do not pack). Until
        then, a stop still ends the waits of re-asks sent meanwhile (as `execute` of the
        online executor does for its own)."""
        source = aiter(calls)
        waker = asyncio.create_task(self._wake_on_stop())
        try:
            async for first in source:
                if first is not None:
                    break
            else:
                return
            if self._config.endpoint == "embeddings":
                await self.packing().execute(_from(first, source), deliver)
            else:
                await self.online().execute(calls_of(_from(first, source)), deliver)
        finally:
            waker.cancel()
            await asyncio.gather(waker, return_exceptions=True)

    async def _wake_on_stop(self) -> None:
        await self._stop.wait()
        if self._online is not None:
            await self._online.wake_on_stop()

    async def close(self) -> None:
        """Close the client, if one was made."""
        if self._client is not None:
            await self._client.close()

    def _online_for(self, config: CallConfig) -> OnlineExecutor:
        from flow.execute.online import OnlineExecutor

        online = OnlineExecutor(config, self.client(), self._limiter,
                                [self._api_key, *config.secrets()], self._stop)
        self._counted.append(online.counters)
        return online


async def _from(first: Call, rest: AsyncIterator[Call | None]) -> AsyncIterator[Call | None]:
    yield first
    async for call in rest:
        yield call
