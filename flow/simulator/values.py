"""Deterministic values for simulated replies: choices, words and numbers drawn from a seed.

The seed is the request's digest and the path names the place a value goes (`$.label`,
`$.tags[1]`), so the same request always gets the same values and two places in one reply
usually get different ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
         "sierra", "tango", "uniform", "victor", "whiskey", "xray"]
FRACTIONS = 9  # a number is drawn from the tenths strictly inside its range: 0.1 .. 0.9

T = TypeVar("T")


def choose(seed: str, path: str, count: int) -> int:
    """An index below `count`, the same for the same seed and path."""
    digest = hashlib.sha256(f"{seed}\x00{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def pick(seed: str, path: str, options: Sequence[T]) -> T:
    """One of `options`, the same for the same seed and path."""
    return options[choose(seed, path, len(options))]


def words(seed: str, path: str, count: int) -> str:
    """`count` words of the phonetic alphabet, separated by spaces."""
    return " ".join(pick(seed, f"{path}#{index}", WORDS) for index in range(count))


def integer_between(seed: str, path: str, low: int, high: int) -> int:
    """A whole number from `low` to `high`, both included (`low` when the range is empty)."""
    if high <= low:
        return low
    return low + choose(seed, path, high - low + 1)


def number_between(seed: str, path: str, low: float, high: float) -> float:
    """A number strictly inside `low`..`high`, rounded to two places when that keeps it inside."""
    if high <= low:
        return low
    exact = low + (high - low) * (1 + choose(seed, path, FRACTIONS)) / (FRACTIONS + 1)
    rounded = round(exact, 2)
    return rounded if low < rounded < high else exact
