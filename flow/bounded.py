"""A time bound on the work flow runs on a user's behalf: templates and post steps.

A template with nested loops, a catastrophic regex or a `python:` step that sleeps would
otherwise hold the event loop, and with it every reply in flight and every signal. The
bound is a real-time alarm: its handler raises `OutOfTime` in the main thread between two
bytecodes, which Python reaches even inside `re` and `time.sleep`. `OutOfTime` is not an
`Exception`, so a user's `except Exception:` cannot swallow it. Off the main thread, where
signals cannot reach, work runs unbounded.

C code such as `re` gives the GIL up only when a signal makes it run Python for a moment, so
a stop's watchdog thread (`flow.stopping`) could not act before the bound: once a stop is
requested, `wake_often` has the alarm also come every fraction of a second, each time only
to let other threads run.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_deadline: float | None = None  # of the bounded work running now
_wake_s: float | None = None  # while a stop is under way: how often the alarm comes
_stop_at: float | None = None  # a stop's deadline: bounded work still running then ends


class OutOfTime(BaseException):
    """The bounded work ran past its time."""


class Stopped(OutOfTime):
    """The run is stopping and its deadline came: the bounded work was ended."""


def _raise(signum: int, frame: Any) -> None:
    if _deadline is None:
        return  # an alarm that came as bounded work ended: nothing to bound
    now = time.monotonic()
    if _stop_at is not None and now >= _stop_at:
        raise Stopped
    if _wake_s is not None and _deadline is not None and now < _deadline:
        return  # only a wake-up: the work still has time
    raise OutOfTime


def _arm() -> None:
    assert _deadline is not None
    left = max(_deadline - time.monotonic(), 1e-6)
    if _wake_s is None:
        signal.setitimer(signal.ITIMER_REAL, left)
    else:
        signal.setitimer(signal.ITIMER_REAL, min(left, _wake_s), _wake_s)


def wake_often(every_s: float | None) -> None:
    """From now on, bounded work on the main thread is woken every `every_s` (None: never,
    as before), so that other threads get to run even while it is inside C code."""
    global _wake_s
    _wake_s = every_s
    if _deadline is not None and threading.current_thread() is threading.main_thread():
        _arm()


def stop_by(deadline: float | None) -> None:
    """Bounded work still running at `deadline` (monotonic seconds; None: no stop) ends with
    `Stopped`, so what a stop must commit is not held up by a post step or a template."""
    global _stop_at
    _stop_at = deadline if deadline is None or _stop_at is None else min(deadline, _stop_at)


def bounded(seconds: float, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)`, or `OutOfTime` once it has run `seconds` of real time."""
    global _deadline
    if threading.current_thread() is not threading.main_thread():
        return work(*args)
    if signal.getsignal(signal.SIGALRM) is not _raise:
        # installed once and left: swapping handlers on every reply was two system calls
        # and an enum lookup each, a few percent of a run's CPU at a thousand replies a second
        signal.signal(signal.SIGALRM, _raise)
    outer = _deadline
    _deadline = time.monotonic() + seconds
    _arm()
    try:
        return work(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _deadline = outer
