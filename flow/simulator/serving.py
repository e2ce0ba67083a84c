"""Serving the simulator: on this event loop (`serve`) or on a thread of its own."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from flow.simulator.config import SimulatorConfig, SimulatorStats
from flow.simulator.server import Simulator


@asynccontextmanager
async def serve(config: SimulatorConfig, port: int = 0,
                host: str = "127.0.0.1") -> AsyncIterator[tuple[str, Simulator]]:
    """Serve a simulator on this event loop; yields its `/v1` base URL and the simulator."""
    simulator = Simulator(config)
    runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/v1", simulator
    finally:
        await runner.cleanup()


class SimulatorThread:
    """A simulator on its own event loop in a background thread, for tests and benchmarks."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.url = ""
        self.simulator: Simulator | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the simulator did not start within 10 s")
        return self

    def __exit__(self, *_: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def stats(self) -> SimulatorStats:
        """What the simulator has received so far."""
        assert self.simulator is not None
        return self.simulator.stats

    def advance(self, seconds: float) -> None:
        """Move the simulated clock forward (batches progress on it), on the server's loop."""
        assert self.simulator is not None
        simulator = self.simulator

        async def advance() -> None:
            simulator.advance(seconds)

        asyncio.run_coroutine_threadsafe(advance(), self._loop).result(120)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        # handlers still sleeping (hangs, latency) end here, not as "destroyed but pending"
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self.config) as (url, simulator):
            self.url, self.simulator = url, simulator
            self._ready.set()
            await self._stop.wait()
