"""The simulator's rate limits, shaped as providers shape theirs, and the headers it sends."""

from __future__ import annotations


class Limit:
    """One limit: a bucket refilled each second (`second`) or a fixed 60 s window (`minute`)."""

    def __init__(self, per_minute: int, window: str, now: float) -> None:
        self.per_minute = per_minute
        self.window = window
        self.capacity = per_minute / 60 if window == "second" else float(per_minute)
        self.level = self.capacity
        self.updated = now
        self.window_start = now

    def _refill(self, now: float) -> None:
        if self.window == "second":
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_minute / 60)
            self.updated = now
        elif now - self.window_start >= 60:
            self.window_start += 60 * ((now - self.window_start) // 60)
            self.level = self.capacity

    def try_take(self, cost: float, now: float) -> float:
        """Take `cost` and return 0, or return the seconds until it would fit."""
        self._refill(now)
        if self.level >= min(cost, self.capacity):
            self.level -= cost
            return 0.0
        if self.window == "second":
            return (min(cost, self.capacity) - self.level) * 60 / self.per_minute
        return self.window_start + 60 - now

    def headers(self, kind: str, now: float) -> dict[str, str]:
        self._refill(now)
        if self.window == "second":
            reset = max(0.0, (self.capacity - self.level) * 60 / self.per_minute)
        else:
            reset = self.window_start + 60 - now
        return {f"x-ratelimit-limit-{kind}": str(self.per_minute),
                f"x-ratelimit-remaining-{kind}": str(max(0, int(self.level))),
                f"x-ratelimit-reset-{kind}": format_duration(reset)}


def format_duration(seconds: float) -> str:
    """OpenAI's style of reset durations: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"
