"""The arithmetic of pacing: admissions spaced evenly, capacity a server reports, and the
numbers in its `x-ratelimit-*` headers. No policy here: flow/limiter.py decides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


@dataclass(slots=True)
class Pace:
    """Admissions spaced evenly at `per_s` units a second (GCRA, the generic cell rate
    algorithm): `due` is when the next unit's turn comes; an admission may go up to
    `tolerance_s` before it, so a waiter woken a little late by a busy event loop loses no
    turn, and a turn missed by more is not made up for (no bunching after a stall)."""

    per_s: float
    due: float
    tolerance_s: float

    def delay(self, now: float) -> float:
        """Seconds until the next admission may go."""
        return max(0.0, self.due - self.tolerance_s - now)

    def take(self, cost: float, now: float) -> None:
        """Admit `cost` units."""
        self.due = max(self.due, now) + cost / self.per_s

    def give_back(self, units: float, now: float) -> None:
        """Correct an admission's cost once it is known: units taken and not used (a token
        estimate too high) bring the next turn sooner, never before `now` (capacity left
        unused in the past is gone: using it now would be a burst); units used beyond the
        estimate push it later."""
        self.due = max(min(self.due, now), self.due - units / self.per_s)


@dataclass(slots=True)
class Credit:
    """Capacity a server reported: `remaining` once it had counted the request that brought
    the units sent to `sent_through`. Everything sent since comes off it; what it had not yet
    counted of the earlier ones comes back to the server later, so the figure only errs low."""

    remaining: float
    sent_through: float

    def left(self, sent_now: float) -> float:
        """What is left of it once `sent_now` units in all have been sent."""
        return self.remaining - (sent_now - self.sent_through)


def header_number(headers: Mapping[str, str], name: str) -> float | None:
    """A header's number; None when absent or not a finite number (`inf`, `1e400`, `nan`)."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset header value such as `1s`, `6m0s`, `20ms` or `0.5`."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number if math.isfinite(number) else None
    parts = DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)
