"""Pace requests at the provider's limits: requests per minute and tokens per minute.

Two token buckets, one counting requests and one counting tokens, each refilled at a little
under its limit and holding at most one second's worth, so a burst never exceeds what a
per-second limiter upstream allows. Waiters are served in order by one lock: only the head
sleeps, and each waiter takes capacity at the moment it is admitted.

The limits are learned as the run goes: `x-ratelimit-limit-*` headers set or lower them,
and with no limits configured only one request is sent until the first response tells what
the server allows. A 429 pauses every sender until the server's `retry-after`, drains the
buckets, cuts the pace and lets it climb back linearly, so waiters are released a few at a
time at the reduced pace, never all at once.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

HEADROOM = 0.98
BURST_S = 1.0
SLOWDOWN = 0.7
MIN_FACTOR = 0.2
RAMP_PER_S = 0.04
DEFAULT_PAUSE_S = 1.0
RATE_WINDOW_S = 10.0
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
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
        return float(text)
    except ValueError:
        pass
    parts = DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


@dataclass(slots=True)
class Bucket:
    """Capacity refilled continuously at `per_s`, holding at most `capacity`."""

    per_s: float
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        """Add what the time since the last update earned."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_s)
            self.updated = now

    def delay(self, cost: float) -> float:
        """Seconds until `cost` (at most a full bucket) is available."""
        need = min(cost, self.capacity) - self.level
        # below a millionth of a unit, floating-point rounding is all that is missing
        return need / self.per_s if need > 1e-6 else 0.0


@dataclass(slots=True)
class Reservation:
    """What one admitted request took from the token budget, to settle later."""

    tokens: int


@dataclass(slots=True)
class LimiterStats:
    """The pace now, for the progress display."""

    requests_per_min: float
    tokens_per_min: float
    rpm_limit: float | None
    tpm_limit: float | None
    paused_s: float
    rate_limited: int


class RateLimiter:
    """Admits requests at the configured or learned limits; see the module docstring."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 learn: bool = True) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._configured = {"requests": rpm, "tokens": tpm}
        self._learned: dict[str, int | None] = {"requests": None, "tokens": None}
        self._buckets: dict[str, Bucket | None] = {"requests": None, "tokens": None}
        self._learn = learn
        self._knows_limits = not learn or rpm is not None or tpm is not None
        self._probe_in_flight = False
        self._probe_done = asyncio.Event()
        self._paused_until = 0.0
        self._factor = 1.0
        self._slowed_at = -1e9
        self._slowed_factor = 1.0
        self._sent: deque[float] = deque()
        self._used_tokens: deque[tuple[float, int]] = deque()
        self.rate_limited = 0
        self._started = self._clock()
        self._rebuild(self._started)

    def limit(self, kind: str) -> int | None:
        """The limit per minute in force for `requests` or `tokens`: the lower of both."""
        values = [v for v in (self._configured[kind], self._learned[kind]) if v is not None]
        return min(values) if values else None

    async def acquire(self, tokens: int) -> Reservation:
        """Wait until one request costing `tokens` fits both budgets, and take it."""
        if self._is_open():
            self._sent.append(self._clock())
            return Reservation(tokens)
        await self._wait_for_probe()
        async with self._lock:
            while True:
                now = self._clock()
                delay = self._delay(now, tokens)
                if delay <= 0:
                    break
                await self._sleep(delay)
            self._take(now, tokens)
        return Reservation(tokens)

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        """Correct the token budget by what the request really used (a refund or a charge)."""
        now = self._clock()
        if used_tokens is None:
            return
        self._used_tokens.append((now, used_tokens))
        bucket = self._buckets["tokens"]
        if bucket is not None:
            bucket.refill(now)
            bucket.level = min(bucket.capacity, bucket.level + reservation.tokens - used_tokens)

    def observe(self, headers: Mapping[str, str] | None, reached_server: bool = True) -> None:
        """Learn limits from a response's `x-ratelimit-*` headers."""
        if headers and self._learn:
            now = self._clock()
            changed = False
            for kind in ("requests", "tokens"):
                limit = _header_number(headers, f"x-ratelimit-limit-{kind}")
                # a limit below one a minute is no limit a server means: ignored
                if limit is not None and limit >= 1 and int(limit) != self._learned[kind]:
                    self._learned[kind] = int(limit)
                    changed = True
                self._hold_if_exhausted(headers, kind, now)
            if changed:
                self._rebuild(now)
        if reached_server and not self._knows_limits:
            self._knows_limits = True
            self._probe_done.set()
        elif not reached_server and self._probe_in_flight and not self._knows_limits:
            self._probe_in_flight = False
            self._probe_done.set()

    def _hold_if_exhausted(self, headers: Mapping[str, str], kind: str, now: float) -> None:
        """The server has nothing left (someone else shares the key): wait for its reset."""
        remaining = _header_number(headers, f"x-ratelimit-remaining-{kind}")
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}") or "")
        if remaining is not None and remaining <= 0 and reset is not None and reset > 0:
            self._paused_until = max(self._paused_until, now + min(reset, 60.0))

    def on_rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: pause everyone until `retry_after_s`, drain the buckets, slow the pace."""
        now = self._clock()
        self.rate_limited += 1
        pause = retry_after_s if retry_after_s is not None and retry_after_s >= 0 else DEFAULT_PAUSE_S
        self._paused_until = max(self._paused_until, now + pause)
        if self.limit("requests") is None:
            seen = self._recent_rate(now) * 60
            if seen > 0 and self._learn:
                self._learned["requests"] = max(1, int(seen))
                self._rebuild(now)
        if now > self._slowed_at + 1.0:
            # one cut per episode: 429s answered for requests already in flight don't compound
            self._factor = max(MIN_FACTOR, self._current_factor(now) * SLOWDOWN)
            self._slowed_factor = self._factor
            self._slowed_at = self._paused_until
            self._rebuild(now)
        for bucket in self._buckets.values():
            if bucket is not None:
                bucket.refill(now)
                bucket.level = min(bucket.level, 0.0)
                bucket.updated = max(bucket.updated, self._paused_until)

    def stats(self) -> LimiterStats:
        """Requests and tokens per minute over the last few seconds, against the limits."""
        now = self._clock()
        rpm = self._recent_rate(now) * 60
        while self._used_tokens and self._used_tokens[0][0] < now - RATE_WINDOW_S:
            self._used_tokens.popleft()
        span = min(RATE_WINDOW_S, max(now - self._started, 1e-9))
        tpm = sum(tokens for _, tokens in self._used_tokens) / span * 60
        return LimiterStats(rpm, tpm, self.limit("requests"), self.limit("tokens"),
                            max(0.0, self._paused_until - now), self.rate_limited)

    def _is_open(self) -> bool:
        """No budget, no pause, no one waiting: admit without taking the lock."""
        return (self._knows_limits and not self._lock.locked()
                and self._buckets["requests"] is None and self._buckets["tokens"] is None
                and self._clock() >= self._paused_until)

    async def _wait_for_probe(self) -> None:
        while not self._knows_limits:
            if not self._probe_in_flight:
                self._probe_in_flight = True
                self._probe_done.clear()
                return
            await self._probe_done.wait()

    def _delay(self, now: float, tokens: int) -> float:
        if now < self._paused_until:
            return self._paused_until - now
        self._rescale(now)
        delays = [0.0]
        for kind, cost in (("requests", 1), ("tokens", tokens)):
            bucket = self._buckets[kind]
            if bucket is not None:
                bucket.refill(now)
                delays.append(bucket.delay(cost))
        return max(delays)

    def _take(self, now: float, tokens: int) -> None:
        for kind, cost in (("requests", 1), ("tokens", tokens)):
            bucket = self._buckets[kind]
            if bucket is not None:
                bucket.level -= cost
        self._sent.append(now)

    def _recent_rate(self, now: float) -> float:
        while self._sent and self._sent[0] < now - RATE_WINDOW_S:
            self._sent.popleft()
        span = min(RATE_WINDOW_S, max(now - self._started, 1e-9))
        return len(self._sent) / span

    def _current_factor(self, now: float) -> float:
        return min(1.0, self._slowed_factor + max(0.0, now - self._slowed_at) * RAMP_PER_S)

    def _rescale(self, now: float) -> None:
        factor = self._current_factor(now)
        if factor != self._factor:
            self._factor = factor
            self._rebuild(now)

    def _rebuild(self, now: float) -> None:
        for kind in ("requests", "tokens"):
            limit = self.limit(kind)
            old = self._buckets[kind]
            if limit is None:
                self._buckets[kind] = None
                continue
            per_s = limit / 60 * HEADROOM * self._factor
            capacity = max(1.0, per_s * BURST_S)
            if old is None:
                # start empty: a full burst on top of a steady pace just under the limit
                # would leave the server no slack for requests that arrive bunched
                self._buckets[kind] = Bucket(per_s, capacity, 0.0, now)
            else:
                old.refill(now)
                old.per_s, old.capacity = per_s, capacity
                old.level = min(old.level, capacity)
