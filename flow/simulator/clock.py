"""The simulated clock that batches progress on: real monotonic time plus an offset.

Tests move it forward (`POST /sim/advance`, `SimulatorThread.advance`) instead of sleeping, so
a batch of 24 hours passes in no time. Unix timestamps are read on the same clock.
"""

from __future__ import annotations

import time


class Clock:
    """Monotonic time plus the seconds it has been advanced by."""

    def __init__(self) -> None:
        self.offset_s = 0.0
        self._started = time.monotonic()
        self._started_epoch = time.time()

    def now(self) -> float:
        """Seconds on the simulated clock (monotonic, so only comparable with itself)."""
        return time.monotonic() + self.offset_s

    def advance(self, seconds: float) -> None:
        """Move the clock forward; it never goes back."""
        if not seconds >= 0:
            raise ValueError(f"cannot advance the clock by {seconds} s")
        self.offset_s += seconds

    def epoch(self, at: float | None = None) -> int:
        """The Unix timestamp of `at` (default: now) on the simulated clock."""
        at = self.now() if at is None else at
        return int(self._started_epoch + at - self._started)
