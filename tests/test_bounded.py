"""The time bound on templates and post steps."""

from __future__ import annotations

import signal
import time

import pytest

from flow.bounded import OutOfTime, bounded


def test_work_within_its_time_returns_its_value() -> None:
    assert bounded(5, str.strip, "  x ") == "x"


def test_work_past_its_time_is_ended() -> None:
    def spin() -> None:
        while True:
            time.monotonic()

    with pytest.raises(OutOfTime):
        bounded(0.05, spin)


def test_an_alarm_after_the_bound_ended_is_ignored() -> None:
    bounded(5, str.strip, " x ")
    signal.raise_signal(signal.SIGALRM)  # late: the handler stays installed, and does nothing
    assert bounded(5, str.upper, "x") == "X"
