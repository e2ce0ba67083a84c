"""Simulated values are drawn from a seed: the same seed and place, the same value."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flow.simulator.values import choose, integer_between, number_between, words


@given(seed=st.text(max_size=8), low=st.integers(-1000, 1000), span=st.integers(0, 1000))
def test_integers_fall_within_both_bounds(seed: str, low: int, span: int) -> None:
    assert low <= integer_between(seed, "$", low, low + span) <= low + span


@given(seed=st.text(max_size=8), low=st.floats(-1e6, 1e6), span=st.floats(1e-6, 1e6))
def test_numbers_fall_strictly_inside_their_range(seed: str, low: float, span: float) -> None:
    high = low + span
    if high > low:
        assert low < number_between(seed, "$", low, high) < high


def test_the_same_seed_and_place_draw_the_same_and_other_places_differ() -> None:
    assert words("seed", "$.a", 4) == words("seed", "$.a", 4)
    assert len({words("seed", f"$.{place}", 4) for place in "abcdefgh"}) > 1
    assert {choose("seed", str(place), 3) for place in range(30)} == {0, 1, 2}
