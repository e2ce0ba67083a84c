"""Ctrl-C and SIGTERM during a run, bounded in every phase.

The first signal asks the run to drain: start nothing new, finish what is in flight for up
to `call.drain_s`. A second signal asks it to stop now. Either way, if the run has not ended
when its time is up (`drain_s` plus a grace for the last commits, or `HARD_STOP_S` after a
second signal), `on_overdue` is called from a watchdog thread: whatever holds the event loop
(a migration, a post step, a store that does not answer), the process still ends. What was
committed stays committed, as under `kill -9`.

The handlers are Python-level (`signal.signal`), not the event loop's: they run in the main
thread between two bytecodes even while the loop is busy, which a loop callback would not. A
watchdog thread needs the GIL, which C code (a catastrophic regex in a post step) gives up only
for a signal: from the first signal on, bounded work is woken often (`flow.bounded`).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from flow.bounded import stop_by, wake_often

HARD_STOP_S = 1.0  # after a second signal
GRACE_S = 5.0  # after drain_s, for the last results to be committed
WAKE_S = 0.1  # how often work holding the main thread lets the watchdog run
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Routes SIGINT and SIGTERM to `request_stop` on the loop, with a deadline for each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_stop: Callable[[], None],
                 drain_s: float, on_overdue: Callable[[], None]) -> None:
        self._loop = loop
        self._request_stop = request_stop
        self._drain_s = drain_s
        self._on_overdue = on_overdue
        self._previous: dict[int, Any] = {}
        self._timers: list[threading.Timer] = []
        self._ended = threading.Event()
        self.count = 0

    def __enter__(self) -> StopSignals:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        self._ended.set()
        wake_often(None)
        stop_by(None)
        for timer in self._timers:
            timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self._loop.call_soon_threadsafe(self._request_stop)
        # a post step inside C code (a catastrophic regex) holds the GIL: woken often, it
        # lets the watchdog thread below run when its time is up
        wake_often(WAKE_S)
        # a post step or template still running when the drain ends (at once, on a second
        # signal) is ended, so the reply it was posting is committed, not lost to the watchdog
        stop_by(time.monotonic() + (self._drain_s if self.count == 1 else 0.0))
        deadline = self._drain_s + GRACE_S if self.count == 1 else HARD_STOP_S
        timer = threading.Timer(deadline, self._overdue)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _overdue(self) -> None:
        if not self._ended.is_set():
            self._on_overdue()
