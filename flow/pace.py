"""The arithmetic of pacing: admissions spaced evenly, capacity a server reports, and the
numbers in its `x-ratelimit-*` headers. No policy here: flow/limiter.py decides.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


@dataclass(slots=True)
class Pace:
    """Admissions spaced evenly at `per_s` units a second (GCRA, the generic cell rate
    algorithm): `due` is when the next unit's turn comes. A waiter that was kept waiting and
    woke late (a busy event loop) keeps the turns it missed, up to `tolerance_s` of them, so
    the pace holds on a loaded machine; one that finds the pace idle starts afresh, so a quiet
    spell never builds a burst. `LastSecond` keeps the turns made up from bunching."""

    per_s: float
    due: float
    tolerance_s: float

    def delay(self, now: float) -> float:
        """Seconds until the next admission's turn."""
        return max(0.0, self.due - now)

    def take(self, cost: float, now: float, waited: bool, not_before: float) -> None:
        """Admit `cost` units; `waited`: the admission was kept waiting for its turn;
        `not_before`: no turn before it is made up (the end of a pause)."""
        start = max(self.due, now - self.tolerance_s if waited else now, not_before)
        self.due = start + cost / self.per_s

    def second(self, kind: str, headroom: float) -> float:
        """What one second may hold at this pace, so turns made up never bunch past the limit:
        the requests even spacing puts in a second (99 at a pace of 98: a sliding window of
        100 never reports none left), or the token limit itself (the pace over `headroom`)."""
        return math.floor(self.per_s) + 1 if kind == "requests" else self.per_s / headroom

    def give_back(self, units: float, now: float) -> None:
        """Correct an admission's cost once it is known: units taken and not used (a token
        estimate too high) bring the next turn sooner, never before `now` (capacity left
        unused in the past is gone: using it now would be a burst); units used beyond the
        estimate push it later."""
        self.due = max(min(self.due, now), self.due - units / self.per_s)


class LastSecond:
    """Units admitted at the pace over the last second: what no one-second window may exceed,
    however the admissions bunched (a loop that woke late making up its turns). `span_s` may
    count the second a little long, so that requests a few milliseconds apart on their way
    to the server, one sent late, the next on time, still fall in different seconds there."""

    def __init__(self, span_s: float = 1.0) -> None:
        self.span_s = span_s
        self._taken: deque[list[float]] = deque()  # [when, units]
        self._sum = 0.0

    def widen(self, seconds: float, most_s: float) -> bool:
        """Count the second `seconds` longer, up to `most_s`: a 429 that a second counted
        that much longer would have spared. False if it was no near miss (a wait longer than
        a second of `most_s` leaves room for) or the second is that long already."""
        if seconds > most_s - 1 or self.span_s >= most_s:
            return False
        self.span_s = min(most_s, self.span_s + seconds)
        return True

    def delay(self, cost: float, capacity: float, now: float) -> float:
        """Seconds until `cost` more fits in a second of `capacity` (at once if nothing is in
        it)."""
        self._expire(now)
        excess = self._sum + cost - capacity
        if excess <= 1e-9 or not self._taken:
            return 0.0
        for when, taken in self._taken:
            excess -= taken
            if excess <= 1e-9:
                return when + self.span_s - now
        return self.span_s

    def add(self, cost: float, now: float) -> list[float]:
        """Count `cost` units admitted now; the entry, to correct once its cost is known."""
        entry = [now, cost]
        self._taken.append(entry)
        self._sum += cost
        return entry

    def correct(self, entry: list[float], units: float, now: float) -> None:
        """An admission cost `units` less than counted (more, if negative)."""
        self._expire(now)
        if entry[0] > now - self.span_s and self._taken:
            units = min(units, entry[1])
            entry[1] -= units
            self._sum -= units

    def _expire(self, now: float) -> None:
        while self._taken and self._taken[0][0] <= now - self.span_s:
            self._sum -= self._taken.popleft()[1]
        if not self._taken:
            self._sum = 0.0


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
