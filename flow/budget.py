"""When to stop sending: `--limit N` calls, `call.max_cost_usd` dollars, or items that all
fail the same way.

Spend is what the store holds for the endpoint before the run plus what this run's replies
cost. Calls in flight are expected to cost what this run's calls have cost on average
(before the first reply, what the caller estimates from the request's size and its output
cap). A call whose start would bring the expected spend to the cap waits for the calls in
flight to settle; once the spend itself reaches the cap, nothing more starts. So a cap is
not overshot by a whole round of `concurrency` calls, nor stopped short by a high guess.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

# where an error names its row ("rows.jsonl row 7: ..."): the same fault on every row differs
# only there
_ROW = re.compile(r"^[^:]* row \d+: ")


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


@dataclass
class Breaker:
    """Stops a run whose items keep failing the same way: `threshold` finished items in a row
    with one permanent error (a mistyped model, a key a proxy answers with 400, a template
    typo), so that it does not fail every item one by one. Errors retried until given up
    (a server down) are not permanent and break the streak, as does an item done."""

    threshold: int
    tripped: str | None = None
    _streak: int = 0
    _last: tuple[str, str] = field(default=("", ""))

    def observe(self, error_class: str | None, error: str | None) -> None:
        """Take in one finished item: its error class and message, or None when it is done."""
        if error_class is None or (error or "").startswith("gave up after"):
            self._streak = 0
            return
        key = (error_class, _ROW.sub("", error or ""))
        if key != self._last:
            self._last, self._streak = key, 0
        self._streak += 1
        if self.threshold and self._streak >= self.threshold and self.tripped is None:
            self.tripped = (
                f"the last {self._streak} items all failed the same way, so the run stopped "
                f"rather than fail every item: {error_class}: {key[1]} (fix it and run again; "
                "call.stop_after_failures sets how many, 0 never stops)")
