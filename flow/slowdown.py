"""What 429s do to the pace: how long everyone pauses, how far below its limit the pace runs
after, and how it climbs back.

`Pause`: until the server's `retry-after`, or briefly when it names none (doubling while no
reply comes). `Slowdown`: a share of a known limit, cut at a 429 met at the pace, climbing
back within seconds to just under where the 429 came, slowly beyond. `SoftPace`: with no
limit known at all, one 429 only pauses; more soon after set a pace from the rate seen, which
doubles while no 429 comes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SLOWDOWN = 0.8  # a cut: this share of the pace it cuts
MIN_FACTOR = 0.2
RAMP_PER_S = 0.1  # a cut pace is back within seconds to just under where the 429 came ...
CEILING = 0.97  # ... this share of the pace it had then ...
CREEP_PER_S = 0.001  # ... and climbs past it only slowly
RECUT_AFTER_S = 1.0  # 429s this soon after a cut answer requests sent before it
SOFT_DOUBLING_S = 1.0  # a pace set from 429s alone doubles this often at first ...
SOFT_DOUBLING_MAX_S = 16.0  # ... and at most this slowly, after climbs that overshot
SOFT_GONE = 64.0  # it is no limit once it has grown this much
SOFT_ARMED_S = 5.0  # a 429 this soon after the last pause sets a soft pace
PAUSE_S = 0.05  # a 429 that names no wait: a short pause, doubling while no reply comes
PAUSE_MAX_S = 8.0
EPISODE_S = 2.0  # a 429 this soon after a pause that named no wait ended doubles the next


@dataclass(slots=True)
class Pause:
    """Until when every sender waits."""

    until: float = -1e9
    streak: int = 0

    def hold(self, until: float) -> None:
        self.until = max(self.until, until)

    def on_429(self, now: float, retry_after_s: float | None) -> None:
        """Wait what the server asks, or, when it names no wait and no pause is on (answers to
        requests already in flight belong to the same one), a short pause, doubling."""
        if retry_after_s is not None and retry_after_s >= 0:
            self.hold(now + retry_after_s)
        elif now >= self.until:
            self.streak = self.streak + 1 if now < self.until + EPISODE_S else 0
            self.until = now + min(PAUSE_MAX_S, PAUSE_S * 2 ** self.streak)

    def reply(self) -> None:
        """A reply came: the server answers again, the next pause is short."""
        self.streak = 0


@dataclass(slots=True)
class Slowdown:
    """The share of a known limit the pace runs at: 1 until a cut, then climbing back."""

    cut_to: float = 1.0
    since: float = -1e9
    ceiling: float = 1.0

    def factor(self, now: float) -> float:
        climbed = max(0.0, now - self.since)
        fast_s = max(0.0, self.ceiling - self.cut_to) / RAMP_PER_S
        if climbed <= fast_s:
            return min(1.0, self.cut_to + climbed * RAMP_PER_S)
        return min(1.0, max(self.cut_to, self.ceiling) + (climbed - fast_s) * CREEP_PER_S)

    def cut(self, now: float, resume_at: float) -> bool:
        """A 429 met at the pace: cut it, to climb back from `resume_at`. False when it
        answers a request sent before the last cut (cuts don't compound)."""
        if now < self.since + RECUT_AFTER_S:
            return False
        factor = self.factor(now)
        self.ceiling = factor * CEILING
        self.cut_to = max(MIN_FACTOR, factor * SLOWDOWN)
        self.since = resume_at
        return True


@dataclass(slots=True)
class Soft:
    """A pace set by 429s when no limit is known: `per_minute` from `since`, doubling every
    `doubling_s`."""

    per_minute: float
    since: float
    doubling_s: float

    def at(self, now: float) -> float:
        return self.per_minute * 2 ** (max(0.0, now - self.since) / self.doubling_s)

    def outgrown(self, now: float) -> bool:
        """Grown past anything it was: no limit any more."""
        return self.at(now) >= self.per_minute * SOFT_GONE


@dataclass(slots=True)
class SoftPace:
    """The pace 429s set when no limit is known: none until a 429 comes soon after another."""

    current: Soft | None = None
    doubling_s: float = SOFT_DOUBLING_S
    armed_until: float = -1.0

    def per_minute(self, now: float) -> int | None:
        return None if self.current is None else max(1, int(self.current.at(now)))

    def expire(self, now: float) -> bool:
        """Whether a pace outgrew itself just now (and is gone)."""
        if self.current is not None and self.current.outgrown(now):
            self.current = None
            return True
        return False

    def on_429(self, now: float, resume_at: float, per_minute_seen: Callable[[], float]) -> bool:
        """A 429 at this pace, or with none: whether the pace changed. A first 429 only
        arms it; one soon after sets it a little below the rate seen since the run resumed;
        a climb that overshot climbs slower next time, and is cut at most once a doubling,
        so 429s that come whatever the rate don't sink it."""
        if self.current is None and now > self.armed_until:
            self.armed_until = resume_at + SOFT_ARMED_S
            return False
        if self.current is not None:
            if now < self.current.since + self.current.doubling_s:
                return False
            self.doubling_s = min(SOFT_DOUBLING_MAX_S, self.doubling_s * 2)
        self.current = Soft(max(1.0, per_minute_seen() * SLOWDOWN), resume_at, self.doubling_s)
        return True
