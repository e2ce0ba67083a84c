"""How far below its limit the pace runs after 429s, and how it climbs back.

Two shapes of it: `Slowdown`, a share of a known limit, cut at a 429 met at the pace and
climbing back within seconds to just under where the 429 came, slowly beyond; and `Soft`, a
pace set from the rate seen when no limit is known at all, doubling while no 429 comes.
"""

from __future__ import annotations

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
