"""The simulator's rate limits, in each shape providers give theirs, and the headers it sends.

A per-minute limit of L is enforced as one of:

- `bucket-1s`: a token bucket holding L/60, refilled continuously (a per-second limit);
- `bucket-60s`: a token bucket holding L, full at the start, refilled at L/60 a second (how
  OpenAI describes its limits: a full minute's worth may go at once);
- `sliding-1s`: at most L/60 in any one second;
- `sliding-60s`: at most L in any 60 seconds;
- `fixed-60s`: at most L in each minute counted from the start.

Every response carries OpenAI's headers: the limit per minute, what may be sent now
(`remaining`), and how long until all of it is back (`reset`).
"""

from __future__ import annotations

from collections import deque

SHAPES = ("bucket-1s", "bucket-60s", "sliding-1s", "sliding-60s", "fixed-60s")
ALIASES = {"second": "bucket-1s", "minute": "fixed-60s"}


class Limit:
    """One limit (requests or tokens per minute) in one shape."""

    def __init__(self, per_minute: int, shape: str, now: float) -> None:
        self.per_minute = per_minute
        self.shape = ALIASES.get(shape, shape)
        if self.shape not in SHAPES:
            raise ValueError(f"unknown limit shape {shape!r}; expected one of {', '.join(SHAPES)}")
        self.span = 1.0 if self.shape.endswith("1s") else 60.0
        self.capacity = per_minute * self.span / 60
        self.level = self.capacity  # the buckets'
        self.updated = now
        self.taken: deque[tuple[float, float]] = deque()  # the sliding windows': (when, cost)
        self.used = 0.0
        self.window_start = now  # the fixed window's

    def try_take(self, cost: float, now: float) -> float:
        """Take `cost` and return 0, or return the seconds until it would fit."""
        cost = min(cost, self.capacity)
        if self.shape.startswith("bucket"):
            self._refill(now)
            if self.level >= cost:
                self.level -= cost
                return 0.0
            return (cost - self.level) * 60 / self.per_minute
        if self.shape.startswith("sliding"):
            self._slide(now)
            if self.used + cost <= self.capacity + 1e-9:
                self.taken.append((now, cost))
                self.used += cost
                return 0.0
            return self._until_room(cost, now)
        self._roll(now)
        if self.used + cost <= self.capacity + 1e-9:
            self.used += cost
            return 0.0
        return self.window_start + 60 - now

    def remaining(self, now: float) -> float:
        """What may be sent now."""
        if self.shape.startswith("bucket"):
            self._refill(now)
            return self.level
        if self.shape.startswith("sliding"):
            self._slide(now)
        else:
            self._roll(now)
        return self.capacity - self.used

    def reset(self, now: float) -> float:
        """Seconds until all of the limit is available again."""
        if self.shape.startswith("bucket"):
            self._refill(now)
            return (self.capacity - self.level) * 60 / self.per_minute
        if self.shape.startswith("sliding"):
            self._slide(now)
            return self.taken[-1][0] + self.span - now if self.taken else 0.0
        self._roll(now)
        return self.window_start + 60 - now if self.used else 0.0

    def headers(self, kind: str, now: float) -> dict[str, str]:
        return {f"x-ratelimit-limit-{kind}": str(self.per_minute),
                f"x-ratelimit-remaining-{kind}": str(max(0, int(self.remaining(now)))),
                f"x-ratelimit-reset-{kind}": format_duration(max(0.0, self.reset(now)))}

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity,
                             self.level + (now - self.updated) * self.per_minute / 60)
            self.updated = now

    def _slide(self, now: float) -> None:
        while self.taken and self.taken[0][0] <= now - self.span:
            self.used -= self.taken.popleft()[1]
        if not self.taken:
            self.used = 0.0

    def _until_room(self, cost: float, now: float) -> float:
        freed = self.capacity - self.used
        for when, taken in self.taken:
            freed += taken
            if freed >= cost:
                return when + self.span - now
        return self.span

    def _roll(self, now: float) -> None:
        if now - self.window_start >= 60:
            self.window_start += 60 * ((now - self.window_start) // 60)
            self.used = 0.0


def format_duration(seconds: float) -> str:
    """OpenAI's style of reset durations: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"
