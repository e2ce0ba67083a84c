"""When to stop sending: `--limit N` calls, or `call.max_cost_usd` dollars.

Spend is what the store holds for the endpoint before the run plus what this run's replies
cost; calls in flight are expected to cost what this run's calls have cost on average, so a
cap is not overshot by a whole round of `concurrency` calls.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Budget:
    """Counts the calls sent and settled, and says when no more may start."""

    limit: int | None = None
    cap_usd: float | None = None
    spent_before_usd: float = 0.0
    sent: int = 0
    outstanding: int = 0  # sent, their results not yet settled
    reached: str | None = None

    def take(self, spent_usd: float) -> bool:
        """Count one more call if it may start, given this run's spend so far."""
        if self.limit is not None and self.sent >= self.limit:
            return False
        if self.cap_usd is not None:
            spent = self.spent_before_usd + spent_usd
            settled = self.sent - self.outstanding
            expected = self.outstanding * spent_usd / max(settled, 1)
            if spent + expected >= self.cap_usd:
                self.reached = (
                    f"spend reached call.max_cost_usd (${spent:.4f} of ${self.cap_usd:.4f}, "
                    f"with ${expected:.4f} more expected from requests in flight); no new "
                    "requests were started. Raise the cap and run again to go on")
                return False
        self.sent += 1
        self.outstanding += 1
        return True

    def settle(self) -> None:
        """A call sent earlier has its result."""
        self.outstanding -= 1
