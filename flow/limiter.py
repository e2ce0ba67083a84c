"""Pace requests at the provider's limits, whatever the shape of those limits.

Providers count in different shapes: a token bucket of one second or of a whole minute, a
sliding window of one second or of sixty, fixed minutes. flow is not told the shape; it
paces so that every shape holds, and uses what the server says it has:

- **Pace.** Each limit (requests, tokens) is a pace just under it, admissions spaced evenly
  (flow/pace.py). A waiter woken late by a busy event loop makes up its turns, but never so
  that the last second holds more than the limit: no one-second window, sliding or not,
  sees more.
- **Capacity the server reports.** `x-ratelimit-remaining-*` says what may be sent now. When
  it holds more than a couple of seconds of pace (a bucket of a minute, full at the start; a
  window of a minute not yet used), flow sends it on top of the pace, counting everything
  sent since the answering request left, so the estimate only ever errs low. `remaining: 0`
  holds everyone until one request's worth is back.
- **Limits learned.** `x-ratelimit-limit-*` sets or lowers a limit; with no limit known, one
  request goes first, to hear what the server says. Token costs are the prompt's tokens and
  the completion reserved (flow/tokens.py), corrected when `usage` arrives.
- **429s.** Everyone pauses (flow/slowdown.py). A near miss (a wait of a few ms: requests
  reach the server a varying few ms after they leave) counts the last second longer by the
  wait, the pace kept. A 429 well below the pace means a burst was the problem: bursts stop,
  the pace stays; one at the pace cuts it, to climb back within seconds; with no limit known
  at all, 429s soon after one another set a pace of their own.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from flow.pace import Credit, LastSecond, Pace, header_number, parse_duration
from flow.slowdown import Pause, Slowdown, SoftPace
from flow.tokens import OutputReserve

__all__ = ["HEADROOM", "LimiterStats", "RateLimiter", "Reservation", "parse_duration"]

KINDS = ("requests", "tokens")
HEADROOM = 0.98
TOLERANCE_S = 0.25  # how late a waiter kept waiting may wake and still make up its turns
CREDIT_MIN_S = 2.0  # reported capacity worth more seconds of pace than this is sent at once
CREDIT_429_S = 60.0  # a 429 this soon after a request went on reported capacity only pauses
BELOW_PACE = 0.9  # a 429 at less than this share of the pace: a burst, not the rate
RATE_WINDOW_S = 10.0
RECHECK_S = 0.05  # the longest a waiter sleeps before it looks at the pace again
HOLD_MIN_S = 0.05  # `remaining: 0` holds everyone at least this long
SECOND_MAX_S = 1.01  # a near miss lengthens the last second by its wait, up to this
SLIP_S = 0.1  # a 429 whose limit frees within this: a window's edge slipped, not the rate
BINDS_SHARE = 0.25  # tokens sent at this share of a learned token pace: prompts counted exactly
BINDS_CHECK_S = 0.25  # how often the share is looked at (a sum over the last few seconds)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class Reservation:
    """What one admitted request took, to settle later: its token estimate, how much had
    been sent up to and including it (to read the capacity its answer reports), and, if its
    tokens went at the pace (not on reported capacity), their count in the last second."""

    tokens: int
    sent_through: dict[str, float] = field(default_factory=dict)
    tokens_counted: list[float] | None = None  # its entry in the last second's tokens


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
                 learn: bool = True, reserve: OutputReserve | None = None) -> None:
        self._clock = clock
        self._reserve = reserve
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._configured = {"requests": rpm, "tokens": tpm}
        self._learned: dict[str, int | None] = {"requests": None, "tokens": None}
        self._paces: dict[str, Pace | None] = {"requests": None, "tokens": None}
        self._credit: dict[str, Credit | None] = {"requests": None, "tokens": None}
        self._sent_units = {"requests": 0.0, "tokens": 0.0}
        # tokens come in lumps, which fill a second less than full already (16 of 300 in
        # 5,000): their second is counted long only once near misses show it must be
        self._last_second = {"requests": LastSecond(SECOND_MAX_S), "tokens": LastSecond()}
        self._learn = learn
        self._knows_limits = not learn or rpm is not None or tpm is not None
        self._probe_in_flight = False
        self._probe_done = asyncio.Event()
        self._pause = Pause()
        self._slowdown = Slowdown()
        self._factor = 1.0
        self._bursts_ok = True
        self._credit_spent_at = -1e9  # when a request last went on reported capacity
        self._soft = SoftPace()
        self._sent: deque[tuple[float, int]] = deque()  # (when, estimated tokens)
        self._sent_tokens = 0  # their sum, kept as they come and go
        self._used_tokens: deque[tuple[float, int]] = deque()
        self._used_sum = 0
        self._tokens_bind = tpm is not None
        self._binds_checked = -1e9
        self.rate_limited = 0
        self._started = self._clock()
        self._rebuild(self._started)

    def limit(self, kind: str) -> int | None:
        """The limit per minute in force for `requests` or `tokens`: the lowest known."""
        values = [v for v in (self._configured[kind], self._learned[kind]) if v is not None]
        soft = self._soft.per_minute(self._clock()) if kind == "requests" else None
        if soft is not None:
            values.append(soft)
        return min(values) if values else None

    def tokens_bind(self) -> bool:
        """Whether the token budget is near enough that prompts are counted exactly: one
        configured, or a learned one the run's tokens reached `BINDS_SHARE` of over the last
        few seconds (for good, once so). Far below it, an estimate is as good: the tokenizer
        is not loaded for a budget that never binds."""
        if self._tokens_bind or self._paces["tokens"] is None:
            return self._tokens_bind
        now = self._clock()
        if now >= self._binds_checked + BINDS_CHECK_S:
            self._binds_checked = now
            pace = self._paces["tokens"]
            self._tokens_bind = self._recent_rates(now)[1] >= pace.per_s * BINDS_SHARE
        return self._tokens_bind

    async def acquire(self, prompt_tokens: int) -> Reservation:
        """Wait until one request of `prompt_tokens` (and the completion `reserve` holds for
        it, reckoned when it goes) may go, and take its turn."""
        if self._is_open():  # no limit known at all: the hot path of an unlimited server
            self._sent_units["requests"] += 1
            self._sent_units["tokens"] += prompt_tokens
            self._sent.append((self._clock(), prompt_tokens))
            self._sent_tokens += prompt_tokens
            return Reservation(prompt_tokens)
        await self._wait_for_probe()
        waited = self._lock.locked()  # behind others: its turn came while it queued
        async with self._lock:
            while True:
                now = self._clock()
                tokens = self._cost(prompt_tokens)
                delay, on_credit = self._admission(now, tokens)
                if delay <= 0:
                    return self._take(now, tokens, on_credit, waited)
                # a look again now and then: tokens given back, or a new report, come sooner
                await self._sleep(min(delay, RECHECK_S))
                waited = True

    def note_reply(self, completion_tokens: int) -> None:
        """A reply came: what later reservations are reckoned from (its completion tokens),
        and the server answers again, so the next 429 that names no wait pauses briefly."""
        self._pause.reply()
        if self._reserve is not None:
            self._reserve.note(completion_tokens)

    def _cost(self, prompt_tokens: int) -> int:
        if self._reserve is None or self._paces["tokens"] is None:
            return prompt_tokens
        return prompt_tokens + self._reserve.tokens()

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        """Correct the token pace by what the request really used (a refund or a charge)."""
        if used_tokens is None:
            return
        self._used_tokens.append((self._clock(), used_tokens))
        self._used_sum += used_tokens
        self._sent_units["tokens"] += used_tokens - reservation.tokens
        pace = self._paces["tokens"]
        if pace is not None and reservation.tokens_counted is not None:
            pace.give_back(reservation.tokens - used_tokens, self._clock())
        if reservation.tokens_counted is not None:
            self._last_second["tokens"].correct(reservation.tokens_counted,
                                                reservation.tokens - used_tokens, self._clock())

    def observe(self, headers: Mapping[str, str] | None, reached_server: bool = True,
                reservation: Reservation | None = None) -> None:
        """Learn limits and reported capacity from a response's `x-ratelimit-*` headers."""
        if headers and self._learn:
            now = self._clock()
            changed = False
            for kind in KINDS:
                limit = header_number(headers, f"x-ratelimit-limit-{kind}")
                # a limit below one a minute is no limit a server means: ignored
                if limit is not None and limit >= 1 and int(limit) != self._learned[kind]:
                    self._learned[kind] = int(limit)
                    changed = True
            if changed:
                self._rebuild(now)
            for kind in KINDS:
                self._note_capacity(headers, kind, reservation, now)
        if reached_server and not self._knows_limits:
            self._knows_limits = True
            self._probe_done.set()
        elif not reached_server and self._probe_in_flight and not self._knows_limits:
            self._probe_in_flight = False
            self._probe_done.set()

    def on_rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: pause everyone until `retry_after_s`; stop bursts or slow the pace."""
        now = self._clock()
        self.rate_limited += 1
        in_episode = now < self._pause.until
        resumed_at = max(self._pause.until, now - RATE_WINDOW_S)
        self._pause.on_429(now, retry_after_s)
        self._credit = {"requests": None, "tokens": None}
        if in_episode or now < self._credit_spent_at + CREDIT_429_S:
            # capacity the server reported ran out before its window came round again
            # (a fixed minute, say): the pause is all there is to it, not the pace's fault
            return
        if self.limit("requests") is None and self.limit("tokens") is None:
            self._soften(now, resumed_at)
        elif retry_after_s is not None and self._near_miss(retry_after_s):
            return  # the last second is counted longer now; the rate was not the problem
        elif retry_after_s is not None and retry_after_s <= SLIP_S:
            return  # the pause is all it needs: cut, the rate would take seconds to return
        elif self._below_pace(now):
            # well below the pace: requests bunched, or a 429 the server sends for reasons of
            # its own; the rate is not the problem: keep it, stop the bursts
            if self._bursts_ok:
                self._bursts_ok = False
                self._rebuild(now)
        elif self._soft.current is not None:
            self._soften(now, resumed_at)
        else:
            self._cut(now)

    def _near_miss(self, wait_s: float) -> bool:
        """A 429 a last second counted `wait_s` longer would have spared: count it so."""
        widened = [self._last_second[kind].widen(wait_s, SECOND_MAX_S)
                   for kind in KINDS if self._paces[kind] is not None]
        return any(widened)

    def stats(self) -> LimiterStats:
        """Requests and tokens per minute over the last few seconds, against the limits."""
        now = self._clock()
        rpm = self._recent_rates(now)[0] * 60
        while self._used_tokens and self._used_tokens[0][0] < now - RATE_WINDOW_S:
            self._used_sum -= self._used_tokens.popleft()[1]
        tpm = self._used_sum / self._span(now) * 60
        return LimiterStats(rpm, tpm, self.limit("requests"), self.limit("tokens"),
                            max(0.0, self._pause.until - now), self.rate_limited)

    def _is_open(self) -> bool:
        """No limit, no pause, no one waiting: admit without taking the lock."""
        return (self._knows_limits and not self._lock.locked()
                and self._paces["requests"] is None and self._paces["tokens"] is None
                and self._clock() >= self._pause.until)

    async def _wait_for_probe(self) -> None:
        while not self._knows_limits:
            if not self._probe_in_flight:
                self._probe_in_flight = True
                self._probe_done.clear()
                return
            await self._probe_done.wait()

    def _admission(self, now: float, tokens: int) -> tuple[float, tuple[str, ...]]:
        """Seconds until a request costing `tokens` may go, and the kinds it would take
        from reported capacity rather than from the pace."""
        if now < self._pause.until:
            return self._pause.until - now, ()
        self._rescale(now)
        delays, on_credit = [0.0], []
        for kind, cost in (("requests", 1), ("tokens", tokens)):
            pace = self._paces[kind]
            wait = 0.0 if pace is None else max(
                pace.delay(now), self._last_second[kind].delay(cost, pace.second(kind, HEADROOM), now))
            credit = self._credit[kind]
            if wait > 0 and credit is not None:
                if credit.left(self._sent_units[kind]) >= cost:
                    on_credit.append(kind)
                    continue
                self._credit[kind] = None  # spent, by its own count: the pace again
            delays.append(wait)
        return max(delays), tuple(on_credit)

    def _take(self, now: float, tokens: int, on_credit: tuple[str, ...],
              waited: bool) -> Reservation:
        reservation = Reservation(tokens)
        for kind, cost in (("requests", 1), ("tokens", tokens)):
            self._sent_units[kind] += cost
            reservation.sent_through[kind] = self._sent_units[kind]
            pace = self._paces[kind]
            if pace is not None and kind not in on_credit:
                pace.take(cost, now, waited, self._pause.until)
                entry = self._last_second[kind].add(cost, now)
                if kind == "tokens":
                    reservation.tokens_counted = entry
        if on_credit:
            self._credit_spent_at = now
        self._sent.append((now, tokens))
        self._sent_tokens += tokens
        return reservation

    def _note_capacity(self, headers: Mapping[str, str], kind: str,
                       reservation: Reservation | None, now: float) -> None:
        """Keep a report of capacity worth more than `CREDIT_MIN_S` of pace (a smaller one
        means the server holds no burst beyond the pace); hold everyone when none is left."""
        remaining = header_number(headers, f"x-ratelimit-remaining-{kind}")
        if remaining is None:
            return
        limit = self.limit(kind)
        # the reset is read only when it is needed: most answers leave capacity
        reset = None if remaining > 0 else parse_duration(
            headers.get(f"x-ratelimit-reset-{kind}") or "")
        if remaining <= 0 and reset is not None and reset > 0:
            # a burst spent it, or someone else shares the key: wait until some is back. The
            # reset is when all of it is (a second, a minute); one request's worth may come
            # back sooner (a bucket refills as it goes), and a 429 then says how long exactly
            back_s = HOLD_MIN_S if limit is None else max(HOLD_MIN_S, 60 / limit)
            self._pause.hold(now + min(reset, back_s, 60.0))
        if reservation is None or limit is None:
            return
        sent_through = reservation.sent_through.get(kind, 0.0)
        credit = self._credit[kind]
        if credit is not None and sent_through < credit.sent_through:
            return  # an older answer than the report in hand
        # capacity the server reports is its own limit's: a lower one configured binds
        if (self._bursts_ok and limit == self._learned[kind]
                and remaining >= limit / 60 * CREDIT_MIN_S):
            self._credit[kind] = Credit(remaining, sent_through)
        else:
            self._credit[kind] = None

    def _below_pace(self, now: float) -> bool:
        """Whether every pace in force ran well below itself over the last few seconds."""
        rates = dict(zip(KINDS, self._recent_rates(now), strict=True))
        paces = [(kind, pace) for kind, pace in self._paces.items() if pace is not None]
        return bool(paces) and all(rates[kind] < pace.per_s * BELOW_PACE for kind, pace in paces)

    def _soften(self, now: float, resumed_at: float) -> None:
        """No limit is known, or the one 429s set was outgrown (`SoftPace`)."""

        def per_minute_seen() -> float:
            sent = sum(1 for when, _ in self._sent if when >= resumed_at)
            return sent / max(now - resumed_at, 1.0 / 60) * 60

        if self._learn and self._soft.on_429(now, self._pause.until, per_minute_seen):
            self._rebuild(now)

    def _cut(self, now: float) -> None:
        """A 429 at the pace: slow it, to climb back from the pause's end."""
        if self._slowdown.cut(now, self._pause.until):
            self._rebuild(now)

    def _recent_rates(self, now: float) -> tuple[float, float]:
        """Requests and estimated tokens sent a second, over the last few seconds."""
        while self._sent and self._sent[0][0] < now - RATE_WINDOW_S:
            self._sent_tokens -= self._sent.popleft()[1]
        span = self._span(now)
        return len(self._sent) / span, self._sent_tokens / span

    def _span(self, now: float) -> float:
        return min(RATE_WINDOW_S, max(now - self._started, 1e-9))

    def _rescale(self, now: float) -> None:
        factor = self._slowdown.factor(now)
        if self._soft.expire(now):
            self._rebuild(now)
        if factor != self._factor or self._soft.current is not None:
            self._factor = factor
            self._rebuild(now)

    def _rebuild(self, now: float) -> None:
        for kind in KINDS:
            tolerance = TOLERANCE_S if self._bursts_ok else 0.0
            limit = self.limit(kind)
            old = self._paces[kind]
            if limit is None:
                self._paces[kind] = None
                continue
            per_s = limit / 60 * HEADROOM * self._factor
            if old is None:
                self._paces[kind] = Pace(per_s, now, tolerance)
            else:
                old.per_s, old.tolerance_s = per_s, tolerance

