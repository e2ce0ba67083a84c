"""When to stop sending: `--limit N` calls, or `call.max_cost_usd` dollars.

Spend is what the store holds for the endpoint before the run plus what this run's replies
cost. Calls in flight are expected to cost what this run's calls have cost on average
(before the first reply, what the caller estimates from the request's size and its output
cap). A call whose start would bring the expected spend to the cap waits for the calls in
flight to settle; once the spend itself reaches the cap, nothing more starts. So a cap is
not overshot by a whole round of `concurrency` calls, nor stopped short by a high guess.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    """Whether the next call may start."""

    GO = "go"
    WAIT = "wait"  # until a call in flight settles and its cost is known
    STOP = "stop"


@dataclass
class Budget:
    """Counts the calls sent and settled, and says whether the next one may start."""

    limit: int | None = None
    cap_usd: float | None = None
    spent_before_usd: float = 0.0
    sent: int = 0
    outstanding: int = 0  # sent, their results not yet settled
    reached: str | None = None

    def take(self, spent_usd: float, estimate_usd: float = 0.0) -> Verdict:
        """Whether one more call may start, given this run's spend so far and what this call
        is estimated to cost; `GO` counts it as sent."""
        if self.limit is not None and self.sent >= self.limit:
            return Verdict.STOP
        if self.cap_usd is not None:
            spent = self.spent_before_usd + spent_usd
            if spent >= self.cap_usd:
                self.reached = (
                    f"spend reached call.max_cost_usd (${spent:.4f} of ${self.cap_usd:.4f}); "
                    "no new requests were started. Raise the cap and run again to go on")
                return Verdict.STOP
            settled = self.sent - self.outstanding
            mean = spent_usd / settled if settled else estimate_usd
            if self.outstanding and spent + self.outstanding * mean >= self.cap_usd:
                return Verdict.WAIT
        self.sent += 1
        self.outstanding += 1
        return Verdict.GO

    def settle(self) -> None:
        """A call sent earlier has its result."""
        self.outstanding -= 1
