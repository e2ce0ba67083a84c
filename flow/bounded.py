"""A time bound on the work flow runs on a user's behalf: templates and post steps.

A template with nested loops, a catastrophic regex or a `python:` step that sleeps would
otherwise hold the event loop, and with it every reply in flight and every signal. The
bound is a real-time alarm: its handler raises `OutOfTime` in the main thread between two
bytecodes, which Python reaches even inside `re` and `time.sleep`. `OutOfTime` is not an
`Exception`, so a user's `except Exception:` cannot swallow it. Off the main thread, where
signals cannot reach, work runs unbounded.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class OutOfTime(BaseException):
    """The bounded work ran past its time."""


def _raise(signum: int, frame: Any) -> None:
    raise OutOfTime


def bounded(seconds: float, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)`, or `OutOfTime` once it has run `seconds` of real time."""
    if threading.current_thread() is not threading.main_thread():
        return work(*args)
    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return work(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
